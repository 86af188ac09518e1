//! ikemgr certificate authentication (`authmethod signature`) against strongSwan, with
//! certificates made in the test by the `openssl` command: a CA, an RSA certificate for
//! Haven's gateway, an ECDSA P-256 certificate for strongSwan, and a second CA that signs a
//! certificate Haven must refuse.
//!
//! ```text
//! client 10.99.1.2 - gwa (charon) 172.31.0.1 ==== 172.31.0.2 gwb (ikemgr+espd) - 10.99.2.2 server
//! ```
//!
//! Needs root, iproute2, openssl and the strongSwan packages (see INTEROP.md); without them
//! the tests FAIL naming what is missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use haven_tests::daemons::wait_for;
use haven_tests::gateway::{require_strongswan as require, Gateway};
use haven_tests::netns::{Netns, ScratchDir, SiteToSite};
use haven_tests::strongswan::{Charon, ChildCfg, Conn, SwanctlConf};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);
const GW_ID: &str = "gwb.haven.test";
const CLIENT_ID: &str = "client1.haven.test";

/// Runs `openssl` with `args` in `dir`; panics with its output on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl command (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const OPENSSL_CONF: &str = "[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
";

/// A PKI made with the openssl CLI in a scratch directory.
struct Pki {
    dir: ScratchDir,
}

impl Pki {
    fn new(label: &str) -> Pki {
        let dir = ScratchDir::new(label).expect("scratch dir");
        std::fs::write(dir.path().join("openssl.cnf"), OPENSSL_CONF).expect("openssl.cnf");
        Pki { dir }
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    /// A self-signed RSA CA `<name>.crt` / `<name>.key`.
    fn ca(&self, name: &str, cn: &str) {
        let d = self.dir.path();
        let key = format!("{name}.key");
        openssl(
            d,
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                &key,
            ],
        );
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                &key,
                "-subj",
                &format!("/CN={cn}"),
                "-days",
                "30",
                "-config",
                "openssl.cnf",
                "-extensions",
                "ca",
                "-out",
                &format!("{name}.crt"),
            ],
        );
    }

    /// A certificate `<name>.crt` for `dns` (CN and DNS subjectAltName) with a new key
    /// `<name>.key` (`rsa` or `ec`), signed by CA `ca`. EC keys are also written in the
    /// traditional SEC1 form `<name>.ec.key`, which strongSwan's `ecdsa/` folder reads.
    fn leaf(&self, name: &str, dns: &str, kind: &str, ca: &str) {
        let d = self.dir.path();
        let key = format!("{name}.key");
        let keyopt = if kind == "rsa" {
            ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]
        } else {
            ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
        };
        let mut args = vec!["genpkey"];
        args.extend(keyopt);
        args.extend(["-out", &key]);
        openssl(d, &args);
        if kind == "ec" {
            openssl(d, &["ec", "-in", &key, "-out", &format!("{name}.ec.key")]);
        }
        let csr = format!("{name}.csr");
        openssl(
            d,
            &[
                "req",
                "-new",
                "-key",
                &key,
                "-subj",
                &format!("/CN={dns}"),
                "-config",
                "openssl.cnf",
                "-out",
                &csr,
            ],
        );
        let ext = format!("{name}.ext");
        std::fs::write(
            d.join(&ext),
            format!(
                "basicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\n\
                 subjectAltName = DNS:{dns}\n"
            ),
        )
        .expect("extension file");
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &format!("{ca}.crt"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-days",
                "10",
                "-extfile",
                &ext,
                "-out",
                &format!("{name}.crt"),
            ],
        );
    }
}

haven_tests::gateway_newtype!(Haven);

impl Haven {
    /// ikemgr + espd in `ns` with `conf_text`, certificates from `cert_dir`.
    fn start(ns: &Netns, label: &str, conf_text: &str, cert_dir: &Path) -> Haven {
        let daemons = [("ikemgr", "127.0.0.1:19701"), ("espd", "127.0.0.1:19704")];
        let env = [("HAVEN_CERT_DIR", cert_dir.as_os_str())];
        Haven(Gateway::start_env(
            ns, label, conf_text, &daemons, &env, WAIT,
        ))
    }
}

/// Haven's certificate folder: `gw.crt` / `gw.key` and the trusted CA in `ca/`.
fn haven_certs(pki: &Pki) -> PathBuf {
    let dir = pki.path("haven");
    std::fs::create_dir_all(dir.join("ca")).expect("cert dir");
    std::fs::copy(pki.path("gw.crt"), dir.join("gw.crt")).expect("copy");
    std::fs::copy(pki.path("gw.key"), dir.join("gw.key")).expect("copy");
    std::fs::copy(pki.path("ca.crt"), dir.join("ca").join("ca.crt")).expect("copy");
    dir
}

/// strongSwan's credentials: its certificate `cert` (`x509/`), SEC1 key (`ecdsa/`), and the
/// trusted CA (`x509ca/`).
fn charon_certs(a: &Charon, pki: &Pki, cert: &str) {
    let d = a.dir();
    std::fs::copy(pki.path(&format!("{cert}.crt")), d.join("x509/client.crt")).expect("copy");
    std::fs::copy(
        pki.path(&format!("{cert}.ec.key")),
        d.join("ecdsa/client.key"),
    )
    .expect("copy");
    std::fs::copy(pki.path("ca.crt"), d.join("x509ca/ca.crt")).expect("copy");
}

fn gateway_config(kind: &str) -> String {
    let peer = match kind {
        "static" => format!(
            "        set type static\n        set remote-gw {}\n        set nattraversal forced\n",
            SiteToSite::GWA_OUTER
        ),
        _ => "        set type dynamic\n".to_string(),
    };
    format!(
        "config vpn ipsec phase1-interface
    edit \"vpn1\"
{peer}        set interface \"out0\"
        set ike-version 2
        set proposal aes128gcm-prfsha256
        set dhgrp 19
        set authmethod signature
        set certificate \"gw\"
        set localid \"{GW_ID}\"
        set peertype one
        set peerid \"{CLIENT_ID}\"
        set dpd disable
    next
end
config vpn ipsec phase2-interface
    edit \"vpn1\"
        set phase1name \"vpn1\"
        set proposal aes128gcm
        set pfs disable
        set src-subnet {}
        set dst-subnet {}
    next
end
",
        SiteToSite::LAN_B,
        SiteToSite::LAN_A
    )
}

fn charon_conf(name: &str) -> SwanctlConf {
    SwanctlConf::new().conn(
        Conn::psk(
            name,
            SiteToSite::GWA_OUTER,
            SiteToSite::GWB_OUTER,
            b"unused",
        )
        .pubkey("client.crt")
        .ids(CLIENT_ID, GW_ID)
        .proposals(&["aes128gcm16-prfsha256-ecp256"])
        .child(
            ChildCfg::new("net", SiteToSite::LAN_A, SiteToSite::LAN_B)
                .esp_proposals(&["aes128gcm16"]),
        ),
    )
}

fn pki_with(label: &str) -> Pki {
    let pki = Pki::new(label);
    pki.ca("ca", "Haven Test CA");
    pki.leaf("gw", GW_ID, "rsa", "ca");
    pki.leaf("client", CLIENT_ID, "ec", "ca");
    pki
}

fn established_and_pinging(line: &SiteToSite, a: &Charon, gw: &Haven, conn: &str) {
    let ss = a
        .wait_child_installed(conn, "net", WAIT)
        .unwrap_or_else(|e| panic!("{e}\nikemgr:\n{}\ncharon:\n{}", gw.log("ikemgr"), a.log()));
    let ours = wait_for("ikemgr has the SA", WAIT, || {
        let v = gw.ike_list();
        v.as_array()
            .and_then(|l| l.first())
            .filter(|s| s["established"] == true)
            .cloned()
            .ok_or_else(|| v.to_string())
    });
    let hex = |v: &Value| u64::from_str_radix(v.as_str().unwrap_or(""), 16).unwrap_or(0);
    assert_eq!((hex(&ours["spi_i"]), hex(&ours["spi_r"])), ss.spis());
    assert_eq!(ours["remote_id"], format!("FQDN {CLIENT_ID}"), "{ours}");
    // strongSwan verified our RSA signature (RFC 7427, SHA-256) and signed with ECDSA.
    let log = a.log();
    assert!(
        log.contains(&format!(
            "authentication of '{GW_ID}' with RSA_EMSA_PKCS1_SHA2_256 successful"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "authentication of '{CLIENT_ID}' (myself) with ECDSA"
        )),
        "{log}"
    );
    wait_for("ping through the certificate tunnel", WAIT, || {
        line.client
            .ping(SiteToSite::SERVER, 1)
            .map(|_| ())
            .map_err(|e| format!("{e}\n{}\n{}", gw.log("ikemgr"), gw.log("espd")))
    });
}

/// A strongSwan dial-up client with an ECDSA certificate connects to our `type dynamic`
/// gateway with an RSA certificate; both verify, and ping passes.
#[test]
fn strongswan_client_and_haven_authenticate_with_certificates() {
    require();
    let pki = pki_with("ikcert-pki");
    let line = SiteToSite::new("ikcert").expect("topology");
    let gw = Haven::start(
        &line.gwb,
        "ikcert-gw",
        &gateway_config("dynamic"),
        &haven_certs(&pki),
    );
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    charon_certs(&a, &pki, "client");
    a.load(&charon_conf("dial")).expect("load client");
    a.initiate("net", WAIT)
        .unwrap_or_else(|e| panic!("{e}\nikemgr:\n{}\ncharon:\n{}", gw.log("ikemgr"), a.log()));
    established_and_pinging(&line, &a, &gw, "dial");
}

/// Our static gateway initiates with its certificate to a strongSwan responder that
/// authenticates with its own.
#[test]
fn haven_initiates_with_a_certificate_to_strongswan() {
    require();
    let pki = pki_with("ikcerti-pki");
    let line = SiteToSite::new("ikcerti").expect("topology");
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    charon_certs(&a, &pki, "client");
    a.load(&charon_conf("gw")).expect("load responder");
    let gw = Haven::start(
        &line.gwb,
        "ikcerti-gw",
        &gateway_config("static"),
        &haven_certs(&pki),
    );
    established_and_pinging(&line, &a, &gw, "gw");
}

/// A client certificate from a CA Haven does not trust is refused: AUTHENTICATION_FAILED,
/// nothing established on either side, no traffic.
#[test]
fn a_client_certificate_from_another_ca_is_refused() {
    require();
    let pki = pki_with("ikcertx-pki");
    pki.ca("other", "Some Other CA");
    pki.leaf("rogue", CLIENT_ID, "ec", "other");
    let line = SiteToSite::new("ikcertx").expect("topology");
    let gw = Haven::start(
        &line.gwb,
        "ikcertx-gw",
        &gateway_config("dynamic"),
        &haven_certs(&pki),
    );
    let mut a = Charon::start(&line.gwa).expect("charon in gwa");
    charon_certs(&a, &pki, "rogue");
    a.load(&charon_conf("dial")).expect("load client");
    assert!(a.initiate("net", Duration::from_secs(8)).is_err());
    let _ = a.terminate_ike("dial", Duration::from_secs(3));
    wait_for("ikemgr says why", WAIT, || {
        let log = gw.log("ikemgr");
        log.contains("peer certificate does not chain to a trusted CA")
            .then_some(())
            .ok_or(log)
    });
    assert!(
        a.log().contains("AUTHENTICATION_FAILED"),
        "strongSwan was told: {}",
        a.log()
    );
    let v = gw.ike_list();
    assert!(
        v.as_array()
            .is_some_and(|l| l.iter().all(|s| s["established"] == false)),
        "{v}"
    );
    assert!(line.client.ping(SiteToSite::SERVER, 1).is_err());
}
