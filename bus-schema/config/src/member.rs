//! FGCP configuration sync support: the per-member keys, the merge of a primary's
//! configuration with a secondary's own per-member keys, and the canonical text the
//! configuration checksums are computed over.
//!
//! FortiOS synchronizes an FGCP cluster's whole configuration from the primary to the
//! secondaries except a few per-member settings (host name, HA device priority,
//! `override`, the reserved management interface, ...). Haven does the same (hasyncd,
//! over the encrypted HA link); [`PER_MEMBER`] is the one list of what stays each
//! member's own. Haven adds `hbdev` and `monitor` to FortiOS's list: the members are
//! Linux hosts whose interface names need not match.
//!
//! Everything here is text in, text out: no IO, no clock.

use std::collections::BTreeMap;

use crate::syntax::{self, Item, Tok};
use crate::ConfigErrors;

/// One per-member key: a `set`/`unset` key, or a nested block, of a `config` block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PerMember {
    /// The block it belongs to, as written after `config` (`system ha`).
    pub block: &'static str,
    /// The key (`priority`) or the nested block's path (`ha-mgmt-interfaces`).
    pub key: &'static str,
    /// A nested `config` block rather than a key.
    pub nested_block: bool,
    /// Why it is not synchronized.
    pub reason: &'static str,
}

const fn key(block: &'static str, key: &'static str, reason: &'static str) -> PerMember {
    PerMember {
        block,
        key,
        nested_block: false,
        reason,
    }
}

const FORTIOS: &str = "FortiOS does not synchronize it";
const THRESHOLD: &str =
    "dynamic weighted load-balancing threshold: FortiOS does not synchronize it";

/// The keys an FGCP secondary keeps from its own file when it takes the primary's
/// configuration. Everything else (the rest of `config system ha`, `config system
/// standalone-cluster`, every phase1/phase2/manual-key tunnel, static routes, ...) comes
/// from the primary.
pub const PER_MEMBER: &[PerMember] = &[
    key("system global", "hostname", FORTIOS),
    key(
        "system ha",
        "priority",
        "HA device priority: FortiOS does not synchronize it",
    ),
    key("system ha", "override", FORTIOS),
    key(
        "system ha",
        "hbdev",
        "heartbeat interfaces: Linux members' interface names may differ (FortiOS synchronizes it)",
    ),
    key(
        "system ha",
        "monitor",
        "monitored interfaces: Linux members' interface names may differ (FortiOS synchronizes it)",
    ),
    key(
        "system ha",
        "ha-mgmt-status",
        "reserved management interface: FortiOS does not synchronize it",
    ),
    PerMember {
        block: "system ha",
        key: "ha-mgmt-interfaces",
        nested_block: true,
        reason: "reserved management interface: FortiOS does not synchronize it",
    },
    key(
        "system ha",
        "unicast-hb-peerip",
        "each member names the other one",
    ),
    key(
        "system ha",
        "sync-config",
        "each member decides whether it takes (secondary) or offers (primary) the configuration",
    ),
    key("system ha", "cpu-threshold", THRESHOLD),
    key("system ha", "memory-threshold", THRESHOLD),
    key("system ha", "http-proxy-threshold", THRESHOLD),
    key("system ha", "ftp-proxy-threshold", THRESHOLD),
    key("system ha", "imap-proxy-threshold", THRESHOLD),
    key("system ha", "nntp-proxy-threshold", THRESHOLD),
    key("system ha", "pop3-proxy-threshold", THRESHOLD),
    key("system ha", "smtp-proxy-threshold", THRESHOLD),
];

/// First words of the comment lines [`merge_member_keys`] puts at the top of a merged
/// file; lines starting with it are dropped from a primary's text before the merge.
pub const HEADER_MARK: &str = "# haven-config-sync:";

fn bearing(block: &str) -> bool {
    PER_MEMBER.iter().any(|p| p.block == block)
}

/// Whether `key` of `config <block>` is per-member (a `set`/`unset` key or, with
/// `nested`, a nested block).
pub fn is_per_member(block: &str, key: &str, nested: bool) -> bool {
    PER_MEMBER
        .iter()
        .any(|p| p.block == block && p.key == key && p.nested_block == nested)
}

/// The synchronized part of a configuration in a canonical form: per-member keys,
/// comments, blank lines, indentation and quoting left out, `config` blocks left empty by
/// that dropped. Two files with the same canonical text configure a member alike but for
/// its per-member keys. Split as FortiOS's checksums: `global` (`config system ...` and
/// whatever is inside `config global`) and `root` (the VPN, routing and everything else).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncedText {
    /// `config system ...` blocks.
    pub global: String,
    /// Every other block.
    pub root: String,
}

fn enc(out: &mut String, t: &str) {
    out.push_str(&t.chars().count().to_string());
    out.push(':');
    out.push_str(t);
}

fn canon_items(items: &[Item], parent: Option<&str>, out: &mut String) {
    for item in items {
        match item {
            Item::Set { key, values } => {
                if parent.is_some_and(|p| is_per_member(p, &key.text, false)) {
                    continue;
                }
                out.push_str("set ");
                enc(out, &key.text);
                for v in values {
                    out.push(' ');
                    enc(out, &v.text);
                }
                out.push('\n');
            }
            Item::Unset { key } => {
                if parent.is_some_and(|p| is_per_member(p, &key.text, false)) {
                    continue;
                }
                out.push_str("unset ");
                enc(out, &key.text);
                out.push('\n');
            }
            Item::Config(b) => {
                let path = b.path_string();
                if parent.is_some_and(|p| is_per_member(p, &path, true)) {
                    continue;
                }
                let mut inner = String::new();
                canon_items(&b.items, Some(&path), &mut inner);
                if inner.is_empty() {
                    continue;
                }
                out.push_str("config");
                for w in &b.path {
                    out.push(' ');
                    enc(out, &w.text);
                }
                out.push('\n');
                out.push_str(&inner);
                out.push_str("end\n");
            }
            Item::Edit(e) => {
                out.push_str("edit ");
                enc(out, &e.name.text);
                out.push('\n');
                canon_items(&e.items, None, out);
                out.push_str("next\n");
            }
        }
    }
}

/// The canonical synchronized text of a configuration (see [`SyncedText`]). Fails with the
/// parse errors when `text` does not load.
pub fn synced_text(text: &str) -> Result<SyncedText, ConfigErrors> {
    crate::parse(text)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut diags = Vec::new();
    let root = syntax::parse_tree(text, &mut diags);
    let mut s = SyncedText::default();
    for item in &root.items {
        match item {
            Item::Config(b) if b.path.first().is_some_and(|w| w.text == "global") => {
                canon_items(&b.items, Some("global"), &mut s.global)
            }
            Item::Config(b) if b.path.first().is_some_and(|w| w.text == "system") => {
                canon_items(std::slice::from_ref(item), None, &mut s.global)
            }
            _ => canon_items(std::slice::from_ref(item), None, &mut s.root),
        }
    }
    Ok(s)
}

/// Why a merge was refused. The secondary keeps its running configuration.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// The primary's configuration does not load.
    #[error("the primary's configuration does not load: {0}")]
    Primary(ConfigErrors),
    /// This member's own configuration does not load (its per-member keys cannot be read).
    #[error("this member's own configuration does not load: {0}")]
    Own(ConfigErrors),
    /// The merged configuration does not load.
    #[error("the merged configuration does not load: {0}")]
    Merged(ConfigErrors),
    /// A statement nesting this module did not expect in a file that loads (a bug).
    #[error("cannot follow the block structure at line {0}")]
    Structure(u32),
}

/// Per-member statements and blocks found in a text, by line (1-based, inclusive).
#[derive(Default)]
struct Scan {
    /// Line ranges of per-member statements and nested blocks, in file order, with the
    /// block they belong to.
    regions: Vec<(String, u32, u32)>,
    /// For each per-member-bearing block (its first occurrence), the line of its `end`.
    ends: BTreeMap<String, u32>,
}

fn last_line(stmt: &[Tok]) -> u32 {
    stmt.last()
        .map(|t| {
            let nl = if t.quoted {
                t.text.matches('\n').count()
            } else {
                0
            };
            t.pos
                .line
                .saturating_add(u32::try_from(nl).unwrap_or(u32::MAX))
        })
        .unwrap_or(0)
}

enum Frame {
    Block(String),
    Edit,
}

/// Walks the statements of a text that loads.
fn scan(text: &str) -> Result<Scan, MergeError> {
    let mut diags = Vec::new();
    let (stmts, _, _) = syntax::lex(text, &mut diags);
    let mut out = Scan::default();
    let mut stack: Vec<Frame> = Vec::new();
    // An open per-member nested block: (its block, first line, depth at which it closes).
    let mut region: Option<(String, u32, usize)> = None;
    for stmt in &stmts {
        let Some((cmd, args)) = stmt.split_first() else {
            continue;
        };
        let first = cmd.pos.line;
        let last = last_line(stmt);
        let parent = match stack.last() {
            Some(Frame::Block(p)) => Some(p.clone()),
            _ => None,
        };
        match cmd.text.as_str() {
            "config" => {
                let path = syntax::join_words(args);
                if region.is_none() {
                    if let Some(p) = parent.as_deref().filter(|p| is_per_member(p, &path, true)) {
                        region = Some((p.to_string(), first, stack.len()));
                    }
                }
                stack.push(Frame::Block(path));
            }
            "edit" => stack.push(Frame::Edit),
            "next" => {
                if !matches!(stack.pop(), Some(Frame::Edit)) {
                    return Err(MergeError::Structure(first));
                }
            }
            "end" => {
                if matches!(stack.last(), Some(Frame::Edit)) {
                    stack.pop();
                }
                let Some(Frame::Block(path)) = stack.pop() else {
                    return Err(MergeError::Structure(first));
                };
                if region.as_ref().is_some_and(|(_, _, d)| *d == stack.len()) {
                    if let Some((p, start, _)) = region.take() {
                        out.regions.push((p, start, last));
                    }
                } else if region.is_none() && bearing(&path) {
                    out.ends.entry(path).or_insert(first);
                }
            }
            "set" | "unset" => {
                if region.is_none() {
                    if let (Some(p), Some(k)) = (parent.as_deref(), args.first()) {
                        if is_per_member(p, &k.text, false) {
                            out.regions.push((p.to_string(), first, last));
                        }
                    }
                }
            }
            _ => return Err(MergeError::Structure(first)),
        }
    }
    Ok(out)
}

/// The primary's configuration with this member's per-member keys: every per-member
/// statement (and nested block) of the primary's text is removed, and this member's own
/// ones (verbatim, from `own`) are put at the end of the same block (or, when the primary
/// has no such block, in a block of their own at the end). Comments and layout of the
/// primary's text are kept; `header` lines (each should start with [`HEADER_MARK`]) go
/// first, and earlier header lines are dropped. The result must load, or the merge is
/// refused.
pub fn merge_member_keys(
    primary: &str,
    own: &str,
    header: &[String],
) -> Result<String, MergeError> {
    crate::parse(primary).map_err(MergeError::Primary)?;
    crate::parse(own).map_err(MergeError::Own)?;
    let primary = primary.strip_prefix('\u{feff}').unwrap_or(primary);
    let own = own.strip_prefix('\u{feff}').unwrap_or(own);
    let p = scan(primary)?;
    let o = scan(own)?;
    let own_lines: Vec<&str> = own.split_inclusive('\n').collect();
    // This member's per-member lines, by block, in its file's order.
    let mut keep: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (block, start, end) in &o.regions {
        let lines = keep.entry(block.clone()).or_default();
        for n in *start..=*end {
            if let Some(l) = own_lines.get((n as usize).wrapping_sub(1)) {
                let mut l = l.to_string();
                if !l.ends_with('\n') {
                    l.push('\n');
                }
                lines.push(l);
            }
        }
    }
    let mut out = String::new();
    for h in header {
        out.push_str(h);
        out.push('\n');
    }
    let drop_line = |n: u32| p.regions.iter().any(|(_, s, e)| *s <= n && n <= *e);
    let mut inserted: Vec<&str> = Vec::new();
    for (i, line) in primary.split_inclusive('\n').enumerate() {
        let n = u32::try_from(i + 1).unwrap_or(u32::MAX);
        if let Some((block, _)) = p.ends.iter().find(|(_, e)| **e == n) {
            if let Some(lines) = keep.get(block) {
                for l in lines {
                    out.push_str(l);
                }
            }
            inserted.push(block.as_str());
        }
        if drop_line(n) || line.starts_with(HEADER_MARK) {
            continue;
        }
        out.push_str(line);
        if !line.ends_with('\n') {
            out.push('\n');
        }
    }
    for (block, lines) in &keep {
        if inserted.contains(&block.as_str()) {
            continue;
        }
        out.push_str(&format!("config {block}\n"));
        for l in lines {
            out.push_str(l);
        }
        out.push_str("end\n");
    }
    crate::parse(&out).map_err(MergeError::Merged)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIMARY: &str = "# the primary's file
config system global
    set hostname \"gw1\"
end
config system ha
    set group-id 5
    set mode a-p
    set password \"pairpw\"
    set hbdev \"port4\" 50
    set priority 200
    set override enable
    set hb-interval 2
end
config vpn ipsec phase1-interface
    edit \"vpn1\"
        set interface \"port2\"
        set ike-version 2
        set remote-gw 192.0.2.1
        set psksecret \"s3cr3t-key\"
        set dpd on-idle
    next
end
config vpn ipsec phase2-interface
    edit \"vpn1\"
        set phase1name \"vpn1\"
    next
end
";

    const OWN: &str = "config system ha
    set group-id 5
    set mode a-p
    set password \"pairpw\"
    set hbdev \"ha0\" 50
    set priority 100
    set hb-interval 9
    config ha-mgmt-interfaces
        edit 1
            set interface \"mgmt1\"
        next
    end
end
config system global
    set hostname gw2
end
";

    #[test]
    fn the_merge_keeps_this_members_keys_and_takes_the_rest() {
        let m = merge_member_keys(PRIMARY, OWN, &[format!("{HEADER_MARK} from member 7")]).unwrap();
        let c = crate::parse(&m).unwrap().config;
        let ha = c.ha.unwrap();
        assert_eq!(ha.priority, 100);
        assert!(
            !ha.override_,
            "override is per member: the secondary has none"
        );
        assert_eq!(ha.hbdev[0].interface, "ha0");
        // Synced keys come from the primary.
        assert_eq!(ha.hb_interval, 2);
        assert_eq!(c.phase1.len(), 1);
        assert_eq!(c.phase2.len(), 1);
        assert!(m.starts_with(HEADER_MARK));
        assert!(m.contains("# the primary's file"));
        assert!(m.contains("mgmt1"), "{m}");
        assert!(
            m.contains("set hostname gw2") && !m.contains("\"gw1\""),
            "{m}"
        );
        assert_eq!(synced_text(&m).unwrap(), synced_text(PRIMARY).unwrap());
        // Merging again (the next sync) changes nothing and keeps one header.
        let again = merge_member_keys(&m, OWN, &[format!("{HEADER_MARK} from member 7")]).unwrap();
        assert_eq!(again.matches(HEADER_MARK).count(), 1);
        assert_eq!(
            crate::parse(&again).unwrap().config,
            crate::parse(&m).unwrap().config
        );
    }

    #[test]
    fn a_primary_block_missing_here_gets_one_of_its_own() {
        let primary =
            "config system ha\n    set group-id 5\n    set mode a-p\n    set hbdev port4 50\nend\n";
        let own = "config system ha\n    set mode a-p\n    set hbdev eth9 50\n    set priority 7\nend\nconfig system global\n    set hostname gw2\nend\n";
        let m = merge_member_keys(primary, own, &[]).unwrap();
        let c = crate::parse(&m).unwrap().config;
        assert_eq!(c.ha.as_ref().unwrap().priority, 7);
        assert_eq!(c.ha.unwrap().group_id, 5);
        assert!(
            m.ends_with("config system global\n    set hostname gw2\nend\n"),
            "{m}"
        );
    }

    #[test]
    fn per_member_keys_do_not_change_the_synced_text() {
        let a = synced_text(PRIMARY).unwrap();
        let other = PRIMARY
            .replace("set priority 200", "set priority 1")
            .replace("    set override enable\n", "")
            .replace("\"gw1\"", "gw9")
            .replace("# the primary's file", "# another comment")
            .replace("        set ike-version 2", "\tset   ike-version \"2\"");
        assert_eq!(synced_text(&other).unwrap(), a);
        // A synced key does.
        let dpd = PRIMARY.replace("set dpd on-idle", "set dpd on-demand");
        let b = synced_text(&dpd).unwrap();
        assert_eq!(b.global, a.global);
        assert_ne!(b.root, a.root);
        let hb = PRIMARY.replace("set hb-interval 2", "set hb-interval 3");
        let b = synced_text(&hb).unwrap();
        assert_ne!(b.global, a.global);
        assert_eq!(b.root, a.root);
        // Token boundaries count: "a b" is not "a" "b".
        let x = synced_text("config system ha\n    set group-name \"a b\"\nend\n").unwrap();
        let y = synced_text("config system ha\n    set group-name a b\nend\n");
        assert!(y.is_err() || y.unwrap() != x);
    }

    #[test]
    fn bad_input_is_refused_with_where() {
        let bad = PRIMARY.replace("set dpd on-idle", "set dpd sometimes");
        match merge_member_keys(&bad, OWN, &[]) {
            Err(MergeError::Primary(e)) => {
                let f = e.first().unwrap();
                assert!(f.line > 0 && f.to_string().contains("dpd"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            merge_member_keys(PRIMARY, "config system ha\n", &[]),
            Err(MergeError::Own(_))
        ));
        assert!(synced_text("set x\n").is_err());
        // A per-member key this member has that does not fit the primary's block: the
        // merged text is checked as a whole.
        let own = "config system ha\n    set priority 999\nend\n";
        assert!(matches!(
            merge_member_keys(PRIMARY, own, &[]),
            Err(MergeError::Own(_))
        ));
    }

    #[test]
    fn nothing_panics_on_odd_texts() {
        for t in [
            "",
            "\u{feff}",
            "config system ha\nend",
            "config global\nconfig system ha\nset priority 3\nend\nend\n",
            "config system ha\n    set group-name \"multi\nline\"\n    set priority 9\nend\n",
        ] {
            let _ = synced_text(t);
            let _ = merge_member_keys(t, PRIMARY, &[]);
            let _ = merge_member_keys(PRIMARY, t, &[]);
            let _ = merge_member_keys(t, t, &[]);
        }
        // Inside `config global`: the per-member key is found there too.
        let g = "config global\nconfig system ha\nset mode a-p\nset hbdev p4 1\nset priority 3\nend\nend\n";
        let m = merge_member_keys(g, OWN, &[]).unwrap();
        assert_eq!(crate::parse(&m).unwrap().config.ha.unwrap().priority, 100);
    }
}
