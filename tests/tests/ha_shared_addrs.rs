//! FGCP shared interface addresses (seed 001's table: the members of a pair share port5's
//! address) move with the primary role, over real sockets, in network namespaces.
//!
//! Two members run hasyncd only (no tunnels are needed: the addresses follow the FGCP
//! role). Their `port4` (hbdev) and `port5` sit on two bridges of a hub namespace, which
//! also has an address on port5's LAN and plays the neighbour whose ARP cache must follow
//! the primary. Both members have `config system interface` / `edit "port5"` / `set ip
//! 172.31.2.1 255.255.255.0`.
//!
//! 1. The primary holds 172.31.2.1/24 on port5, the secondary does not; the hub reaches it
//!    at the primary's MAC.
//! 2. The primary is powered off (hasyncd SIGKILLed, its links down): the secondary becomes
//!    primary, adds the address and announces it; the hub's ARP entry moves to the new
//!    primary's MAC without the hub asking (gratuitous ARP) and pings are answered.
//! 3. The old primary comes back (links up, hasyncd restarted with a lower priority): the
//!    address its SIGKILLed hasyncd left on port5 is removed as soon as it starts, before
//!    port5 comes up, and the hub keeps reaching the new primary.
//!
//! Timings are printed, never asserted.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use haven_tests::daemons::{bin, vpnctl_json, wait_for, TempDir};
use haven_tests::netns::{preflight, veth, Netns, Proc};

const SHARED: &str = "172.31.2.1";

struct Member {
    ns: Netns,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Member {
    fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    fn start(&mut self, priority: u8) {
        let config = self.dir.join("haven.conf");
        std::fs::write(&config, member_config(priority)).unwrap();
        let run_dir = self.run_dir();
        std::fs::create_dir_all(&run_dir).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("hasyncd.log"))
            .unwrap();
        let mut cmd = self.ns.command(bin("hasyncd"));
        cmd.args([
            "--config",
            config.to_str().unwrap(),
            "--run-dir",
            run_dir.to_str().unwrap(),
            "--metrics-listen",
            "127.0.0.1:9703",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        self.proc = Some(self.ns.spawn_command(cmd).expect("spawn hasyncd"));
    }

    fn role(&self) -> Option<String> {
        let st = vpnctl_json(&self.run_dir(), &["diagnose", "sys", "ha", "status"]).ok()?;
        st["role"].as_str().map(str::to_string)
    }

    /// Whether port5 carries the shared address.
    fn holds(&self) -> bool {
        self.ns
            .ip(&["-4", "-o", "addr", "show", "dev", "port5"])
            .map(|s| s.contains(&format!("inet {SHARED}/24")))
            .unwrap_or(false)
    }

    fn mac(&self) -> String {
        self.ns
            .run("cat", &["/sys/class/net/port5/address"])
            .unwrap()
            .trim()
            .to_string()
    }

    fn metric(&self, name: &str) -> u64 {
        self.ns
            .run("curl", &["-s", "http://127.0.0.1:9703/metrics"])
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("hasyncd.log")).unwrap_or_default()
    }
}

fn member_config(priority: u8) -> String {
    format!(
        "config system ha\n    set group-id 7\n    set group-name \"SH\"\n    set mode a-p\n    \
         set password \"shared-addr-test\"\n    set hbdev \"port4\" 50\n    set priority {priority}\n    \
         set override disable\n    set hb-interval 1\n    set hb-lost-threshold 3\nend\n\
         config system interface\n    edit \"port5\"\n        set vdom \"root\"\n        \
         set ip {SHARED} 255.255.255.0\n        set allowaccess ping\n    next\n    \
         edit \"port4\"\n        set ip 169.254.0.9 255.255.255.0\n    next\nend\n"
    )
}

/// The hub's ARP entry for the shared address: its MAC, if any.
fn hub_neigh(hub: &Netns) -> Option<String> {
    let out = hub
        .ip(&["-4", "neigh", "show", SHARED, "dev", "br5"])
        .ok()?;
    let mut w = out.split_whitespace();
    w.find(|t| *t == "lladdr")?;
    w.next().map(str::to_string)
}

fn dump(members: &[Member]) -> String {
    members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let log = m.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!(
                "--- member {i} hasyncd log (last 40 lines)\n{}\n",
                tail.join("\n")
            )
        })
        .collect()
}

fn setup(dir: &Path) -> (Netns, Vec<Member>) {
    preflight().expect("preflight");
    let hub = Netns::new("hashub").unwrap();
    hub.add_bridge("br4").unwrap();
    hub.add_bridge("br5").unwrap();
    hub.add_addr("br5", "172.31.2.9/24").unwrap();
    let mut members = Vec::new();
    for i in 0..2 {
        let ns = Netns::new(&format!("hasm{i}")).unwrap();
        for (port, br) in [("port4", "br4"), ("port5", "br5")] {
            let hub_if = format!("{port}m{i}");
            veth(&ns, port, &hub, &hub_if).unwrap();
            hub.enslave(&hub_if, br).unwrap();
            hub.link_up(&hub_if).unwrap();
            ns.link_up(port).unwrap();
        }
        ns.add_addr("port4", &format!("169.254.0.{}/24", i + 1))
            .unwrap();
        // hasyncd/README.md "Host setup": an address of the member's own on the interface.
        ns.ip(&[
            "addr",
            "add",
            &format!("10.255.0.{}/32", i + 1),
            "dev",
            "port5",
            "scope",
            "host",
        ])
        .unwrap();
        let d = dir.join(format!("m{i}"));
        std::fs::create_dir_all(&d).unwrap();
        members.push(Member {
            ns,
            dir: d,
            proc: None,
        });
    }
    (hub, members)
}

#[test]
fn shared_interface_addresses_follow_the_primary() {
    let dir = TempDir::new("ha-shared-addrs");
    let (hub, mut m) = setup(dir.path());
    m[0].start(200);
    m[1].start(100);

    // 1. Member 0 (priority 200) is primary and holds the address; member 1 does not.
    wait_for(
        "member 0 primary holding the shared address, member 1 secondary without it",
        Duration::from_secs(30),
        || {
            let r = (m[0].role(), m[1].role(), m[0].holds(), m[1].holds());
            if r == (
                Some("primary".into()),
                Some("secondary".into()),
                true,
                false,
            ) {
                Ok(())
            } else {
                Err(format!("{r:?}\n{}", dump(&m)))
            }
        },
    );
    let st = vpnctl_json(&m[0].run_dir(), &["diagnose", "sys", "ha", "status"]).unwrap();
    assert!(
        st["shared_addresses"]
            .as_array()
            .is_some_and(|a| a.iter().any(|s| s == "172.31.2.1/24 dev port5")),
        "{st}"
    );
    assert!(
        !st.to_string().contains("169.254.0.9"),
        "the hbdev's address is not shared: {st}"
    );
    hub.ping(SHARED, 1).expect("the hub reaches the primary");
    let mac0 = m[0].mac();
    let mac1 = m[1].mac();
    assert_eq!(hub_neigh(&hub).as_deref(), Some(mac0.as_str()));

    // 2. Power member 0 off: its hasyncd is SIGKILLed (the address stays on its port5,
    // as on a machine that died) and its links go down.
    let t0 = Instant::now();
    m[0].proc.take().unwrap().kill_now().unwrap();
    for port in ["port4", "port5"] {
        m[0].ns.ip(&["link", "set", port, "down"]).unwrap();
    }
    assert!(
        m[0].holds(),
        "test premise: a SIGKILLed primary leaves the address"
    );
    wait_for(
        "member 1 primary holding the shared address",
        Duration::from_secs(30),
        || {
            let r = (m[1].role(), m[1].holds());
            if r == (Some("primary".into()), true) {
                Ok(())
            } else {
                Err(format!("{r:?}\n{}", dump(&m)))
            }
        },
    );
    println!("member 1 holds {SHARED} {:?} after the kill", t0.elapsed());
    // The hub's entry moves to member 1's MAC by the announcements alone (the hub sends
    // nothing to the address meanwhile).
    wait_for(
        "the hub's ARP entry for the shared address on member 1's MAC",
        Duration::from_secs(15),
        || match hub_neigh(&hub) {
            Some(mac) if mac == mac1 => Ok(()),
            other => Err(format!("{other:?} (member 1 is {mac1})")),
        },
    );
    println!(
        "the hub's ARP entry moved {:?} after the kill",
        t0.elapsed()
    );
    assert!(m[1].metric("hasyncd_gratuitous_arps_total") >= 1);
    hub.ping(SHARED, 1)
        .expect("the hub reaches the new primary");

    // 3. Member 0 comes back: heartbeat link up, hasyncd restarted (priority 50, so it
    // stays secondary); the stale address goes before port5 comes up.
    m[0].ns.link_up("port4").unwrap();
    m[0].start(50);
    wait_for(
        "member 0 secondary without the stale address",
        Duration::from_secs(30),
        || {
            let r = (m[0].role(), m[0].holds());
            if r == (Some("secondary".into()), false) {
                Ok(())
            } else {
                Err(format!("{r:?}\n{}", dump(&m)))
            }
        },
    );
    m[0].ns.link_up("port5").unwrap();
    assert_eq!(m[1].role().as_deref(), Some("primary"));
    assert!(m[1].holds() && !m[0].holds());
    hub.ping(SHARED, 3).expect("the hub still reaches member 1");
    assert_eq!(hub_neigh(&hub).as_deref(), Some(mac1.as_str()));
    assert!(
        m[0].log()
            .contains("shared address 172.31.2.1/24 removed from port5"),
        "{}",
        dump(&m)
    );
}
