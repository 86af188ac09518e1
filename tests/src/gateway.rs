//! One Haven gateway in a namespace for the strongSwan site-to-site and dial-up suites
//! (`lifecycle`, `phase2_knobs`, `tunnel_monitor`, `dpdmon_strongswan`, ...): a scratch
//! directory with the configuration, the run-dir and one log per daemon, the daemons a
//! suite asks for, and the `vpnctl` views those suites read.
//!
//! The daemons are [`Proc`] guards: they are killed when the [`Gateway`] is dropped, also
//! when the test fails (the scratch directory is then kept for inspection).

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::daemons::{bin, vpnctl, vpnctl_json, wait_for};
use crate::netns::{Netns, Proc, ScratchDir};
use crate::strongswan;

/// Panics naming what is missing when strongSwan tests cannot run on this machine.
pub fn require_strongswan() {
    if let Err(e) = strongswan::preflight() {
        panic!("cannot run strongSwan tests on this machine: {e}");
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A Haven gateway's daemons, sharing one configuration file and run-dir.
pub struct Gateway {
    pub ns: Netns,
    pub dir: ScratchDir,
    pub run: PathBuf,
    pub conf: PathBuf,
    pub procs: Vec<Proc>,
}

impl Gateway {
    /// Writes `conf_text` to a new scratch directory tagged `label` and starts `daemons`
    /// (name, `--metrics-listen` address) in `ns`, in order, each logging at debug level to
    /// its own new `<daemon>.log`. Does not wait for anything.
    pub fn spawn(ns: &Netns, label: &str, conf_text: &str, daemons: &[(&str, &str)]) -> Gateway {
        Gateway::spawn_env(ns, label, conf_text, daemons, &[])
    }

    /// [`Gateway::spawn`] with `env` added to each daemon's environment.
    pub fn spawn_env(
        ns: &Netns,
        label: &str,
        conf_text: &str,
        daemons: &[(&str, &str)],
        env: &[(&str, &OsStr)],
    ) -> Gateway {
        let dir = ScratchDir::new(label).expect("scratch dir");
        let run = dir.path().join("run");
        let conf = dir.path().join("haven.conf");
        std::fs::write(&conf, conf_text).expect("write config");
        let mut gw = Gateway {
            ns: ns.clone(),
            dir,
            run,
            conf,
            procs: Vec::new(),
        };
        for (daemon, metrics) in daemons {
            let log = gw.dir.path().join(format!("{daemon}.log"));
            let f = std::fs::File::create(&log).expect("log file");
            let mut cmd: Command = ns.command(bin(daemon));
            cmd.arg("--config")
                .arg(&gw.conf)
                .arg("--run-dir")
                .arg(&gw.run)
                .args(["--log-level", "debug"])
                .args(["--metrics-listen", metrics])
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(f);
            gw.procs.push(ns.spawn_command(cmd).expect("spawn daemon"));
        }
        gw
    }

    /// [`Gateway::spawn`], then waits up to `wait` for ikemgr to listen on UDP 500.
    pub fn start(
        ns: &Netns,
        label: &str,
        conf_text: &str,
        daemons: &[(&str, &str)],
        wait: Duration,
    ) -> Gateway {
        Gateway::start_env(ns, label, conf_text, daemons, &[], wait)
    }

    /// [`Gateway::start`] with `env` added to each daemon's environment.
    pub fn start_env(
        ns: &Netns,
        label: &str,
        conf_text: &str,
        daemons: &[(&str, &str)],
        env: &[(&str, &OsStr)],
        wait: Duration,
    ) -> Gateway {
        let gw = Gateway::spawn_env(ns, label, conf_text, daemons, env);
        wait_for("ikemgr listening", wait, || {
            gw.log("ikemgr")
                .contains("listening on UDP 500")
                .then_some(())
                .ok_or_else(|| gw.log("ikemgr"))
        });
        gw
    }

    /// `<daemon>.log` so far (empty when absent).
    pub fn log(&self, daemon: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{daemon}.log"))).unwrap_or_default()
    }

    /// The last `lines` lines of each of `daemons`' logs, each under `--- <daemon>:`.
    pub fn log_tails(&self, daemons: &[&str], lines: usize) -> String {
        daemons
            .iter()
            .map(|d| format!("--- {d}:\n{}", tail(&self.log(d), lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `vpnctl <args>`'s standard output followed by its standard error.
    pub fn text(&self, args: &[&str]) -> String {
        let o = vpnctl(&self.run, args);
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    /// `diagnose vpn ike gateway list` (panics when the view cannot be read).
    pub fn ike_list(&self) -> Value {
        vpnctl_json(&self.run, &["diagnose", "vpn", "ike", "gateway", "list"])
            .expect("ike gateway list")
    }

    /// `diagnose vpn tunnel list` (panics when the view cannot be read).
    pub fn tunnel_list(&self) -> Value {
        vpnctl_json(&self.run, &["diagnose", "vpn", "tunnel", "list"]).expect("tunnel list")
    }

    /// ikemgr's `lifecycle` view of `tunnel` (the whole view when it is not listed).
    pub fn lifecycle(&self, tunnel: &str) -> Value {
        let v = vpnctl_json(&self.run, &["diagnose", "vpn", "ike", "lifecycle"])
            .expect("lifecycle view");
        v.as_array()
            .and_then(|l| l.iter().find(|g| g["name"] == tunnel).cloned())
            .unwrap_or(v)
    }

    /// True when ikemgr has an established IKE SA of `tunnel` with a CHILD SA, and, when
    /// `peer` is given, a remote address starting with it.
    pub fn ike_up(&self, tunnel: &str, peer: Option<&str>) -> bool {
        vpnctl_json(&self.run, &["diagnose", "vpn", "ike", "gateway", "list"])
            .ok()
            .and_then(|v| v.as_array().cloned())
            .into_iter()
            .flatten()
            .any(|s| {
                s["name"] == tunnel
                    && s["established"] == true
                    && peer.is_none_or(|p| s["remote"].as_str().is_some_and(|r| r.starts_with(p)))
                    && s["children"].as_array().is_some_and(|c| !c.is_empty())
            })
    }
}

/// Declares `struct $name(Gateway)`, which derefs to [`Gateway`]: a suite's own gateway
/// type, to which the suite adds its constructor and views.
#[macro_export]
macro_rules! gateway_newtype {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        struct $name($crate::gateway::Gateway);

        impl std::ops::Deref for $name {
            type Target = $crate::gateway::Gateway;
            fn deref(&self) -> &$crate::gateway::Gateway {
                &self.0
            }
        }
    };
}
