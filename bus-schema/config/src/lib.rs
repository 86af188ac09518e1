//! Haven configuration: the FortiOS CLI dialect parsed into a typed model.
//!
//! One file per gateway, in the syntax of FortiOS's `show` output:
//! `config <path…>` / `edit <name>` / `set <key> <value…>` / `unset <key>` /
//! `next` / `end`, with quoted strings (`"…"` or `'…'`, backslash escapes),
//! `#` comments, blank lines and CRLF line ends.
//!
//! # What it does
//! - Reads `config system ha`, `config system standalone-cluster` (with
//!   `config cluster-peer`), `config vpn ipsec phase1-interface`,
//!   `config vpn ipsec phase2-interface`, `config vpn ipsec
//!   manualkey-interface` and `config router static` into [`Config`],
//!   applying FortiOS defaults to keys that are not set (each default is
//!   documented on its field). `config system interface` is read leniently:
//!   `ip` and `type` of each entry ([`Interface`]), every other key and
//!   nested block accepted with a warning.
//! - Manual-key tunnels ([`ManualKey`]): ESP with fixed SPIs and hex keys,
//!   no IKE. Haven implements AES-CBC with HMAC-SHA1/256/512 and, as
//!   extensions FortiOS does not have, AES-GCM and ChaCha20-Poly1305
//!   `enc-alg` values and the `encapsulation`, `replay`, `src-subnet` and
//!   `dst-subnet` keys. `MANUALKEY.md` next to this crate's manifest has the
//!   whole block with a two-gateway example.
//! - Sorts every key into one of three outcomes: implemented (applied), a
//!   FortiOS key Haven knows but does not implement (a [`Warning`] with its
//!   line), anything else (a [`ConfigError`] with line, column and what was
//!   expected). Bad values are errors too. Other FortiOS blocks
//!   (`config system global`, `config firewall policy`, …) are ignored with
//!   a warning; `config global` and `config vdom` wrappers are looked into.
//! - Validates across blocks: a phase2 naming a missing phase1, duplicate
//!   edits, a static phase1 without `remote-gw`, IKEv1, a name used by both
//!   a phase1-interface and a manualkey-interface, an inbound SPI used
//!   twice, …
//! - Keeps key material in [`Secret`], which never prints.
//!
//! # What it does not do
//! - No IO beyond [`load`] reading one file; no clock, no sockets.
//! - It does not decide which algorithms the IKE daemon supports: it parses
//!   every FortiOS proposal name and leaves negotiation policy to `ikemgr`.
//! - It does not write configurations back out.
//! - Haven-specific settings with no FortiOS key (exponential DPD backoff,
//!   millisecond heartbeats) are not read yet; [`HavenSettings`] is where
//!   they will go.
//!
//! # Fuzzing
//! `fuzz/` is a cargo-fuzz crate with its own workspace: from this
//! directory, `cargo +nightly fuzz run parse` (the fixtures are its seed
//! corpus). The same target body runs on stable as the `fuzz_smoke` test.
//!
//! ```
//! let text = "config vpn ipsec phase1-interface\n\
//!     edit \"vpn1\"\n set interface \"port2\"\n set ike-version 2\n\
//!     set remote-gw 192.0.2.1\n set psksecret s3cr3tkey\n next\nend\n\
//!     config vpn ipsec phase2-interface\n edit \"vpn1\"\n set phase1name \"vpn1\"\n next\nend\n";
//! let parsed = haven_config::parse(text).unwrap();
//! assert_eq!(parsed.config.phase1[0].dpd_retryinterval_ms, 20_000);
//! assert_eq!(parsed.config.phase2_for("vpn1").count(), 1);
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod build;
mod diag;
mod keys;
pub mod member;
mod model;
mod secret;
mod syntax;

use std::io::Read;
use std::path::Path;

use serde::Serialize;

pub use diag::{ConfigError, ConfigErrors, ErrorKind, Warning};
pub use model::*;
pub use secret::{Secret, SecretForm, REDACTED};
pub use syntax::MAX_DEPTH;

/// Largest file [`load`] reads.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// A configuration that loaded, with the warnings it produced.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Parsed {
    /// The model.
    pub config: Config,
    /// Ignored FortiOS keys and blocks, and accepted oddities, in file order.
    pub warnings: Vec<Warning>,
}

/// Parse configuration text. Never panics. On failure returns every error
/// found, and the warnings: errors in the text itself (syntax, unknown keys
/// and blocks, bad values) come first, in file order, then consistency
/// errors ([`ErrorKind::Invalid`]: missing required keys, dangling
/// references, duplicates), in file order. So [`ConfigErrors::first`] is
/// the most direct problem.
pub fn parse(text: &str) -> Result<Parsed, ConfigErrors> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut diags = Vec::new();
    let root = syntax::parse_tree(text, &mut diags);
    let mut ctx = build::Ctx::default();
    for d in diags {
        match d {
            syntax::SyntaxDiag::Error(pos, kind) => ctx.error(pos, "", kind),
            syntax::SyntaxDiag::Warning(pos, msg) => ctx.warn(pos, "", "", msg),
        }
    }
    let config = build::build(&mut ctx, &root);
    let mut errors = ctx.errors;
    let mut warnings = ctx.warnings;
    errors.sort_by_key(|e| (matches!(e.kind, ErrorKind::Invalid { .. }), e.line, e.col));
    warnings.sort_by_key(|w| (w.line, w.col));
    if errors.is_empty() {
        Ok(Parsed { config, warnings })
    } else {
        Err(ConfigErrors { errors, warnings })
    }
}

fn io_error(file: &str, reason: String) -> ConfigErrors {
    ConfigErrors {
        errors: vec![ConfigError {
            file: Some(file.to_string()),
            line: 0,
            col: 0,
            block: String::new(),
            kind: ErrorKind::Io { reason },
        }],
        warnings: Vec::new(),
    }
}

/// Read and parse a configuration file. Diagnostics carry the file name as
/// given. Files over [`MAX_FILE_BYTES`] or not UTF-8 are errors.
pub fn load(path: &Path) -> Result<Parsed, ConfigErrors> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| io_error(&name, e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error(&name, e.to_string()))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(io_error(
            &name,
            format!("larger than {MAX_FILE_BYTES} bytes"),
        ));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        io_error(
            &name,
            format!("not UTF-8 (at byte {})", e.utf8_error().valid_up_to()),
        )
    })?;
    match parse(&text) {
        Ok(mut p) => {
            for w in &mut p.warnings {
                w.file = Some(name.clone());
            }
            Ok(p)
        }
        Err(mut e) => {
            e.set_file(&name);
            Err(e)
        }
    }
}

/// The outcome of `vpnctl config check FILE`, for text or `--json` views.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CheckReport {
    /// The file as given.
    pub file: String,
    /// True when the configuration loads.
    pub ok: bool,
    /// Errors (empty when `ok`).
    pub errors: Vec<ConfigError>,
    /// Warnings.
    pub warnings: Vec<Warning>,
    /// Counts of what loaded (when `ok`): phase1, phase2, routes, manual-key
    /// tunnels.
    pub summary: Option<CheckSummary>,
}

/// What a configuration that loads contains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct CheckSummary {
    /// `config system ha` present.
    pub ha: bool,
    /// `config system standalone-cluster` present.
    pub standalone: bool,
    /// phase1-interface entries.
    pub phase1: usize,
    /// phase2-interface entries.
    pub phase2: usize,
    /// router static entries.
    pub routes: usize,
    /// manualkey-interface entries.
    pub manualkey: usize,
}

impl CheckReport {
    /// Check `path`.
    pub fn run(path: &Path) -> CheckReport {
        let file = path.display().to_string();
        match load(path) {
            Ok(p) => CheckReport {
                file,
                ok: true,
                errors: Vec::new(),
                summary: Some(CheckSummary {
                    ha: p.config.ha.is_some(),
                    standalone: p.config.standalone.is_some(),
                    phase1: p.config.phase1.len(),
                    phase2: p.config.phase2.len(),
                    routes: p.config.routes.len(),
                    manualkey: p.config.manualkey.len(),
                }),
                warnings: p.warnings,
            },
            Err(e) => CheckReport {
                file,
                ok: false,
                errors: e.errors,
                warnings: e.warnings,
                summary: None,
            },
        }
    }

    /// The process exit code: 0 when the configuration loads, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        if self.ok {
            0
        } else {
            1
        }
    }

    /// The text view: one diagnostic per line, then a summary line.
    pub fn to_text(&self) -> String {
        let mut lines: Vec<(u32, u32, String)> = self
            .warnings
            .iter()
            .map(|w| (w.line, w.col, w.to_string()))
            .chain(self.errors.iter().map(|e| (e.line, e.col, e.to_string())))
            .collect();
        lines.sort_by_key(|(l, c, _)| (*l, *c));
        let mut out = String::new();
        for (_, _, text) in lines {
            out.push_str(&text);
            out.push('\n');
        }
        match &self.summary {
            // The manual-key count is printed only when there are some, so
            // the line of a configuration without any is unchanged.
            Some(s) => out.push_str(&format!(
                "{}: OK ({} warning{}; ha: {}, standalone-cluster: {}, phase1: {}, phase2: {}, static routes: {}{})\n",
                self.file,
                self.warnings.len(),
                if self.warnings.len() == 1 { "" } else { "s" },
                if s.ha { "yes" } else { "no" },
                if s.standalone { "yes" } else { "no" },
                s.phase1,
                s.phase2,
                s.routes,
                if s.manualkey > 0 {
                    format!(", manualkey: {}", s.manualkey)
                } else {
                    String::new()
                }
            )),
            None => out.push_str(&format!(
                "{}: {} error{}, {} warning{}\n",
                self.file,
                self.errors.len(),
                if self.errors.len() == 1 { "" } else { "s" },
                self.warnings.len(),
                if self.warnings.len() == 1 { "" } else { "s" },
            )),
        }
        out
    }
}

/// `vpnctl config check FILE`: (exit code, text). Prints the warnings and
/// exits 0, or prints the errors (and warnings) and exits 1.
pub fn check_report(path: &Path) -> (i32, String) {
    let r = CheckReport::run(path);
    (r.exit_code(), r.to_text())
}

/// The fuzz target's body: parse arbitrary text and check invariants that
/// must hold for any input (no panic, every error has a position,
/// diagnostics render). Shared by `fuzz/` and the in-tree smoke test.
///
/// It panics when an invariant is broken: that is its purpose (the fuzzer
/// reports the panic). Not for production callers.
#[doc(hidden)]
pub fn fuzz_one(text: &str) {
    // Configuration sync: the canonical text and a merge never panic either, and a text
    // merged with itself keeps its synced part.
    if let Ok(synced) = member::synced_text(text) {
        let merged = member::merge_member_keys(text, text, &[]);
        if let Ok(m) = merged {
            assert_eq!(
                member::synced_text(&m).ok(),
                Some(synced),
                "merge changed {text:?}"
            );
        }
    }
    match parse(text) {
        Ok(p) => {
            for w in &p.warnings {
                let _ = w.to_string();
            }
            let _ = format!("{:?}", p.config);
        }
        Err(e) => {
            assert!(!e.errors.is_empty());
            for err in &e.errors {
                assert!(err.line >= 1 && err.col >= 1, "{err:?}");
                let _ = err.to_string();
            }
        }
    }
}
