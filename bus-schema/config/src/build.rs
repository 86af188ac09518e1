//! From the block tree to the typed [`Config`]: key dispatch (implemented /
//! known-but-ignored / unknown), value parsing with FortiOS defaults, and
//! semantic validation.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::diag::{ConfigError, ErrorKind, Warning};
use crate::keys::{self, Spec};
use crate::model::*;
use crate::secret::{Secret, SecretForm};
use crate::syntax::{Block, Edit, Item, Pos, Tok};

/// Collected diagnostics.
#[derive(Default)]
pub(crate) struct Ctx {
    pub errors: Vec<ConfigError>,
    pub warnings: Vec<Warning>,
}

impl Ctx {
    pub fn error(&mut self, pos: Pos, block: &str, kind: ErrorKind) {
        self.errors.push(ConfigError {
            file: None,
            line: pos.line,
            col: pos.col,
            block: block.to_string(),
            kind,
        });
    }

    fn invalid(&mut self, pos: Pos, block: &str, message: impl Into<String>) {
        self.error(
            pos,
            block,
            ErrorKind::Invalid {
                message: message.into(),
            },
        );
    }

    pub fn warn(&mut self, pos: Pos, block: &str, key: &str, message: impl Into<String>) {
        self.warnings.push(Warning {
            file: None,
            line: pos.line,
            col: pos.col,
            block: block.to_string(),
            key: key.to_string(),
            message: message.into(),
        });
    }

    fn bad(&mut self, tok: &Tok, block: &str, key: &str, expected: impl Into<String>) {
        self.error(
            tok.pos,
            block,
            ErrorKind::BadValue {
                key: key.to_string(),
                value: tok.text.clone(),
                expected: expected.into(),
            },
        );
    }
}

const NOT_IMPLEMENTED: &str = "FortiOS key not implemented by Haven; ignored";

struct SetRef<'t> {
    key: &'t Tok,
    values: &'t [Tok],
}

/// The implemented keys of one block (last `set` wins, `unset` removes)
/// and its nested blocks.
struct Fields<'t> {
    block: String,
    sets: BTreeMap<&'static str, SetRef<'t>>,
    subs: Vec<&'t Block>,
}

fn expected_keys(spec: &Spec, word: &str) -> String {
    let hint = keys::suggest(
        word,
        spec.implemented.iter().chain(spec.known.iter()).copied(),
    )
    .map(|s| format!("did you mean \"{s}\"? "))
    .unwrap_or_default();
    format!("{hint}expected one of {}", spec.implemented.join(", "))
}

/// Sort the items of an object block (not a table) by key.
fn collect<'t>(
    ctx: &mut Ctx,
    spec: &Spec,
    label: String,
    items: &'t [Item],
    subs_allowed: &[&str],
) -> Fields<'t> {
    let mut f = Fields {
        block: label,
        sets: BTreeMap::new(),
        subs: Vec::new(),
    };
    for item in items {
        match item {
            Item::Set { key, .. } | Item::Unset { key } => {
                let values: &[Tok] = match item {
                    Item::Set { values, .. } => values,
                    _ => &[],
                };
                if let Some(k) = spec.implemented.iter().find(|k| **k == key.text) {
                    if matches!(item, Item::Unset { .. }) {
                        f.sets.remove(k);
                    } else if let Some(prev) = f.sets.insert(k, SetRef { key, values }) {
                        ctx.warn(
                            key.pos,
                            &f.block,
                            k,
                            format!(
                                "set again (first at line {}); the later value wins",
                                prev.key.pos.line
                            ),
                        );
                    }
                } else if spec.known.contains(&key.text.as_str()) {
                    ctx.warn(key.pos, &f.block, &key.text, NOT_IMPLEMENTED);
                } else {
                    ctx.error(
                        key.pos,
                        &f.block,
                        ErrorKind::UnknownKey {
                            key: key.text.clone(),
                            block: f.block.clone(),
                            expected: expected_keys(spec, &key.text),
                        },
                    );
                }
            }
            Item::Config(b) => {
                let p = b.path_string();
                if subs_allowed.contains(&p.as_str()) {
                    f.subs.push(b);
                } else if spec.known_blocks.contains(&p.as_str()) {
                    ctx.warn(
                        b.pos,
                        &f.block,
                        "",
                        format!("nested block \"config {p}\" is not implemented by Haven; ignored"),
                    );
                } else {
                    let mut all: Vec<&str> = subs_allowed.to_vec();
                    all.extend(spec.known_blocks.iter().copied());
                    let expected = if all.is_empty() {
                        format!("{} has no nested blocks", spec.name)
                    } else {
                        format!("expected one of the nested blocks {}", all.join(", "))
                    };
                    ctx.error(
                        b.pos,
                        &f.block,
                        ErrorKind::UnknownBlock { path: p, expected },
                    );
                }
            }
            Item::Edit(e) => {
                ctx.error(
                    e.pos,
                    &f.block,
                    ErrorKind::Syntax {
                        message: format!(
                            "{} is not a table: expected set, unset or config, found edit",
                            spec.name
                        ),
                    },
                );
            }
        }
    }
    f
}

/// The edits of a table block; anything else is an error.
fn table_edits<'t>(ctx: &mut Ctx, label: &str, items: &'t [Item]) -> Vec<&'t Edit> {
    let mut out = Vec::new();
    for item in items {
        let (pos, what) = match item {
            Item::Edit(e) => {
                out.push(e);
                continue;
            }
            Item::Set { key, .. } => (key.pos, "set"),
            Item::Unset { key } => (key.pos, "unset"),
            Item::Config(b) => (b.pos, "config"),
        };
        ctx.error(
            pos,
            label,
            ErrorKind::Syntax {
                message: format!("{label} is a table: expected edit <name>, found {what}"),
            },
        );
    }
    out
}

fn parse_uint(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_ipv4(s: &str) -> Option<Ipv4Addr> {
    s.parse().ok()
}

fn ipv4_or_unset(ip: Ipv4Addr) -> Option<Ipv4Addr> {
    if ip.is_unspecified() {
        None
    } else {
        Some(ip)
    }
}

/// FortiOS Diffie-Hellman group numbers (IANA transform type 4 IDs,
/// RFC 7296 §3.3.2 and the IANA IKEv2 registry).
const DH_GROUPS: &[u16] = &[
    1, 2, 5, 14, 15, 16, 17, 18, 19, 20, 21, 27, 28, 29, 30, 31, 32,
];

fn parse_dhgrp(s: &str) -> Option<u16> {
    let v = u16::try_from(parse_uint(s)?).ok()?;
    DH_GROUPS.contains(&v).then_some(v)
}

fn lookup<T: Copy>(table: &[(&str, T)], s: &str) -> Option<T> {
    table.iter().find(|(n, _)| *n == s).map(|(_, v)| *v)
}

/// Parse a FortiOS proposal name (`aes128-sha1`, `aes256gcm-prfsha384`,
/// `aes128gcm`, `null-sha1`, `aes128-null`).
pub(crate) fn parse_proposal(s: &str, ike: bool) -> Option<Proposal> {
    let (enc, rest) = match s.split_once('-') {
        Some((e, r)) => (e, Some(r)),
        None => (s, None),
    };
    let encryption = lookup(&Encryption::ALL, enc)?;
    let hash = if encryption.is_aead() {
        match (ike, rest) {
            (true, Some(r)) => Some(lookup(&Hash::ALL, r.strip_prefix("prf")?)?),
            (false, None) => None,
            _ => return None,
        }
    } else {
        match rest? {
            "null" if !ike && encryption != Encryption::Null => None,
            r => Some(lookup(&Hash::ALL, r)?),
        }
    };
    if ike && encryption == Encryption::Null {
        return None;
    }
    Some(Proposal {
        encryption,
        hash,
        ike,
    })
}

const SINGLE: &str = "a single value (quote values that contain spaces)";

impl<'t> Fields<'t> {
    fn has(&self, key: &str) -> bool {
        self.sets.contains_key(key)
    }

    fn key_pos(&self, key: &str) -> Option<Pos> {
        self.sets.get(key).map(|s| s.key.pos)
    }

    fn value_pos(&self, key: &str) -> Option<Pos> {
        self.sets
            .get(key)
            .and_then(|s| s.values.first())
            .map(|t| t.pos)
    }

    fn values(&self, key: &str) -> Option<&'t [Tok]> {
        self.sets.get(key).map(|s| s.values)
    }

    fn single(&self, ctx: &mut Ctx, key: &str) -> Option<&'t Tok> {
        let s = self.sets.get(key)?;
        if let Some(extra) = s.values.get(1) {
            ctx.bad(extra, &self.block, key, SINGLE);
            return None;
        }
        s.values.first()
    }

    fn parse<T>(
        &self,
        ctx: &mut Ctx,
        key: &str,
        expected: &str,
        f: impl FnOnce(&str) -> Option<T>,
    ) -> Option<T> {
        let tok = self.single(ctx, key)?;
        let v = f(&tok.text);
        if v.is_none() {
            ctx.bad(tok, &self.block, key, expected);
        }
        v
    }

    fn uint<T: TryFrom<u64>>(&self, ctx: &mut Ctx, key: &str, min: u64, max: u64) -> Option<T> {
        self.parse(ctx, key, &format!("an integer {min}..={max}"), |s| {
            parse_uint(s)
                .filter(|v| (min..=max).contains(v))
                .and_then(|v| T::try_from(v).ok())
        })
    }

    fn choice<T: Copy>(
        &self,
        ctx: &mut Ctx,
        key: &str,
        table: &[(&str, T)],
        note: &str,
    ) -> Option<T> {
        let names: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
        let expected = format!("one of {}{note}", names.join(", "));
        self.parse(ctx, key, &expected, |s| lookup(table, s))
    }

    /// `enable`/`disable`; FortiOS's listing sometimes prints `enabled`,
    /// which is accepted with a warning.
    fn flag(&self, ctx: &mut Ctx, key: &str) -> Option<bool> {
        let tok = self.single(ctx, key)?;
        match tok.text.as_str() {
            "enable" => Some(true),
            "disable" => Some(false),
            "enabled" | "disabled" => {
                let on = tok.text == "enabled";
                ctx.warn(
                    tok.pos,
                    &self.block,
                    key,
                    format!(
                        "\"{}\" read as \"{}\" (FortiOS spells it without the d)",
                        tok.text,
                        if on { "enable" } else { "disable" }
                    ),
                );
                Some(on)
            }
            _ => {
                ctx.bad(tok, &self.block, key, "one of enable, disable");
                None
            }
        }
    }

    fn string(&self, ctx: &mut Ctx, key: &str, max_chars: usize) -> Option<String> {
        let tok = self.single(ctx, key)?;
        if tok.text.chars().count() > max_chars {
            ctx.bad(
                tok,
                &self.block,
                key,
                format!("at most {max_chars} characters"),
            );
            return None;
        }
        Some(tok.text.clone())
    }

    /// A string where `''` means unset.
    fn opt_string(&self, ctx: &mut Ctx, key: &str, max_chars: usize) -> Option<Option<String>> {
        self.string(ctx, key, max_chars)
            .map(|s| if s.is_empty() { None } else { Some(s) })
    }

    fn words(&self, ctx: &mut Ctx, key: &str, max_chars: usize) -> Option<Vec<String>> {
        self.list(
            ctx,
            key,
            &format!("a name of at most {max_chars} characters"),
            |s| (s.chars().count() <= max_chars).then(|| s.to_string()),
        )
        .map(|v| v.into_iter().filter(|s| !s.is_empty()).collect())
    }

    fn list<T>(
        &self,
        ctx: &mut Ctx,
        key: &str,
        expected: &str,
        f: impl Fn(&str) -> Option<T>,
    ) -> Option<Vec<T>> {
        let values = self.values(key)?;
        let mut out = Vec::with_capacity(values.len());
        let mut ok = true;
        for tok in values {
            match f(&tok.text) {
                Some(v) => out.push(v),
                None => {
                    ctx.bad(tok, &self.block, key, expected);
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    fn ipv4(&self, ctx: &mut Ctx, key: &str) -> Option<Ipv4Addr> {
        self.parse(ctx, key, "an IPv4 address", parse_ipv4)
    }

    /// `ADDRESS MASK` or `ADDRESS/LEN`.
    fn net(&self, ctx: &mut Ctx, key: &str) -> Option<Ipv4Net> {
        const EXPECTED: &str = "a subnet: ADDRESS MASK or ADDRESS/LENGTH";
        let values = self.values(key)?;
        let (addr_tok, addr, len) = match values {
            [one] => {
                let (a, l) = match one.text.split_once('/') {
                    Some(x) => x,
                    None => {
                        ctx.bad(one, &self.block, key, EXPECTED);
                        return None;
                    }
                };
                let len = parse_uint(l)
                    .filter(|v| *v <= 32)
                    .and_then(|v| u8::try_from(v).ok());
                match (parse_ipv4(a), len) {
                    (Some(a), Some(l)) => (one, a, l),
                    _ => {
                        ctx.bad(one, &self.block, key, EXPECTED);
                        return None;
                    }
                }
            }
            [a, m] => {
                let Some(addr) = parse_ipv4(&a.text) else {
                    ctx.bad(a, &self.block, key, "an IPv4 address");
                    return None;
                };
                let mask = parse_ipv4(&m.text).map(u32::from);
                let len = mask.and_then(|m| {
                    let l = m.leading_ones();
                    let l8 = u8::try_from(l).ok()?;
                    (prefix_mask(l8) == m).then_some(l8)
                });
                let Some(len) = len else {
                    ctx.bad(
                        m,
                        &self.block,
                        key,
                        "a contiguous netmask such as 255.255.255.0",
                    );
                    return None;
                };
                (a, addr, len)
            }
            [_, _, extra, ..] => {
                ctx.bad(extra, &self.block, key, EXPECTED);
                return None;
            }
            [] => return None,
        };
        let mask = prefix_mask(len);
        let net = Ipv4Addr::from(u32::from(addr) & mask);
        if net != addr {
            ctx.warn(
                addr_tok.pos,
                &self.block,
                key,
                format!("host bits set; using {net}/{len}"),
            );
        }
        Some(Ipv4Net {
            addr: net,
            prefix_len: len,
        })
    }

    /// `ADDRESS/LEN` with an IPv6 address and a length 0..=128 (host bits cleared, with a
    /// warning).
    fn net6(&self, ctx: &mut Ctx, key: &str) -> Option<(Ipv6Addr, u8)> {
        const EXPECTED: &str = "an IPv6 prefix: ADDRESS/LENGTH";
        let tok = self.single(ctx, key)?;
        let parsed = tok.text.split_once('/').and_then(|(a, l)| {
            let len = parse_uint(l).filter(|v| *v <= 128)?;
            Some((a.parse::<Ipv6Addr>().ok()?, u8::try_from(len).ok()?))
        });
        let Some((addr, len)) = parsed else {
            ctx.bad(tok, &self.block, key, EXPECTED);
            return None;
        };
        let mask = match len {
            0 => 0,
            l => u128::MAX << (128 - u32::from(l)),
        };
        let net = Ipv6Addr::from(u128::from(addr) & mask);
        if net != addr {
            ctx.warn(
                tok.pos,
                &self.block,
                key,
                format!("host bits set; using {net}/{len}"),
            );
        }
        Some((net, len))
    }

    /// A secret: `VALUE`, `ENC blob` (FortiOS-encrypted, unusable) or a
    /// `***` mask (unusable).
    fn secret(&self, ctx: &mut Ctx, key: &str, min_len: usize) -> Option<Secret> {
        let values = self.values(key)?;
        match values {
            [enc, rest @ ..] if !enc.quoted && enc.text == "ENC" && !rest.is_empty() => {
                ctx.warn(
                    enc.pos,
                    &self.block,
                    key,
                    "FortiOS-encrypted secret (ENC …) cannot be decrypted by Haven and cannot be \
                     used; write the key in clear",
                );
                let blob: Vec<&str> = rest.iter().map(|t| t.text.as_str()).collect();
                Some(Secret::with_form(
                    blob.join(" "),
                    SecretForm::FortiosEncrypted,
                ))
            }
            [one] => {
                if one.text.len() >= 3 && one.text.chars().all(|c| c == '*') {
                    ctx.warn(
                        one.pos,
                        &self.block,
                        key,
                        "masked placeholder (********) cannot be used as a key; write the key in clear",
                    );
                    return Some(Secret::with_form(one.text.as_bytes(), SecretForm::Masked));
                }
                let n = one.text.chars().count();
                if n > 128 {
                    ctx.error(
                        one.pos,
                        &self.block,
                        ErrorKind::BadValue {
                            key: key.to_string(),
                            value: "<redacted>".into(),
                            expected: "at most 128 characters".into(),
                        },
                    );
                    return None;
                }
                if n < min_len {
                    ctx.warn(
                        one.pos,
                        &self.block,
                        key,
                        format!("shorter than FortiOS's minimum of {min_len} characters"),
                    );
                }
                Some(Secret::new(one.text.as_bytes()))
            }
            [_, extra, ..] => {
                ctx.error(
                    extra.pos,
                    &self.block,
                    ErrorKind::BadValue {
                        key: key.to_string(),
                        value: "<redacted>".into(),
                        expected: "a single value (quote a secret that contains spaces)".into(),
                    },
                );
                None
            }
            [] => None,
        }
    }
}

/// What the builder remembers of each entry's position for validation.
struct P1Pos {
    edit: Pos,
    monitor: Option<Pos>,
    /// Positions of `tunnel-monitor-source-ip` and `tunnel-monitor-destination-ip`.
    tunnel_monitor: (Option<Pos>, Option<Pos>),
}

struct P2Pos {
    edit: Pos,
    phase1name: Option<Pos>,
}

struct MkPos {
    edit: Pos,
    local_spi: Option<Pos>,
}

#[derive(Default)]
struct State {
    config: Config,
    ha_pos: Option<Pos>,
    sa_pos: Option<Pos>,
    p1: Vec<P1Pos>,
    p2: Vec<P2Pos>,
    p1_names: BTreeMap<String, Pos>,
    p2_names: BTreeMap<String, Pos>,
    mk: Vec<MkPos>,
    mk_names: BTreeMap<String, Pos>,
    route_ids: BTreeMap<u32, Pos>,
    if_names: BTreeMap<String, Pos>,
}

fn edit_label(table: &str, e: &Edit) -> String {
    format!("{table}, edit \"{}\"", e.name.text)
}

/// Record an edit name; false (with an error) when it is a duplicate.
fn first_edit<K: Ord + Clone>(
    ctx: &mut Ctx,
    seen: &mut BTreeMap<K, Pos>,
    key: &K,
    e: &Edit,
    table: &str,
) -> bool {
    if let Some(first) = seen.get(key) {
        ctx.invalid(
            e.pos,
            table,
            format!(
                "duplicate edit \"{}\" in {table} (first at line {})",
                e.name.text, first.line
            ),
        );
        return false;
    }
    seen.insert(key.clone(), e.pos);
    true
}

/// A numeric edit name; `edit 0` takes the next free number.
fn edit_number<V>(ctx: &mut Ctx, e: &Edit, table: &str, seen: &BTreeMap<u32, V>) -> Option<u32> {
    match parse_uint(&e.name.text).and_then(|v| u32::try_from(v).ok()) {
        Some(0) => Some(
            seen.keys()
                .next_back()
                .map(|m| m.saturating_add(1))
                .unwrap_or(1),
        ),
        Some(n) => Some(n),
        None => {
            ctx.bad(&e.name, table, "edit", "an entry number 0..=4294967295");
            None
        }
    }
}

fn build_ha(ctx: &mut Ctx, b: &Block) -> Ha {
    let f = collect(ctx, &keys::HA, keys::HA.name.to_string(), &b.items, &[]);
    let mut ha = Ha::default();
    if let Some(v) = f.uint(ctx, "group-id", 0, 1023) {
        ha.group_id = v;
    }
    if let Some(v) = f.string(ctx, "group-name", 32) {
        ha.group_name = v;
    }
    if let Some(v) = f.choice(
        ctx,
        "mode",
        &[
            ("standalone", HaMode::Standalone),
            ("a-p", HaMode::ActivePassive),
        ],
        " (Haven does not implement a-a)",
    ) {
        ha.mode = v;
    }
    ha.password = f.secret(ctx, "password", 1);
    if let Some(values) = f.values("hbdev") {
        let mut ok = true;
        let mut out = Vec::new();
        for pair in values.chunks(2) {
            match pair {
                [name, prio] => {
                    match parse_uint(&prio.text)
                        .filter(|v| *v <= 512)
                        .and_then(|v| u16::try_from(v).ok())
                    {
                        Some(_) if out.iter().any(|h: &HbDev| h.interface == name.text) => {
                            ctx.bad(name, &f.block, "hbdev", "each interface once");
                            ok = false;
                        }
                        Some(p) => out.push(HbDev {
                            interface: name.text.clone(),
                            priority: p,
                        }),
                        None => {
                            ctx.bad(
                                prio,
                                &f.block,
                                "hbdev",
                                "a priority 0..=512 after the interface name",
                            );
                            ok = false;
                        }
                    }
                }
                [name] => {
                    ctx.bad(
                        name,
                        &f.block,
                        "hbdev",
                        format!("a priority 0..=512 after interface \"{}\"", name.text),
                    );
                    ok = false;
                }
                _ => {}
            }
        }
        if ok {
            ha.hbdev = out;
        }
    }
    if let Some(v) = f.uint(ctx, "priority", 0, 255) {
        ha.priority = v;
    }
    if let Some(v) = f.flag(ctx, "override") {
        ha.override_ = v;
    }
    if let Some(v) = f.flag(ctx, "session-pickup") {
        ha.session_pickup = v;
    }
    if let Some(v) = f.uint(ctx, "hb-interval", 1, 20) {
        ha.hb_interval = v;
    }
    if let Some(v) = f.choice(
        ctx,
        "hb-interval-in-milliseconds",
        &[("100ms", 100u32), ("10ms", 10u32)],
        "",
    ) {
        ha.hb_tick_ms = v;
    }
    if let Some(v) = f.uint(ctx, "hb-lost-threshold", 1, 60) {
        ha.hb_lost_threshold = v;
    }
    if let Some(v) = f.words(ctx, "monitor", 35) {
        ha.monitor = v;
    }
    if let Some(v) = f.flag(ctx, "sync-config") {
        ha.sync_config = v;
    }
    if ha.mode == HaMode::ActivePassive {
        if ha.hbdev.is_empty() && !f.has("hbdev") {
            ctx.invalid(
                b.pos,
                &f.block,
                "mode a-p needs at least one heartbeat interface (set hbdev)",
            );
        }
        if ha.password.is_none() {
            ctx.warn(
                b.pos,
                &f.block,
                "password",
                "no cluster password: the HA link keys would derive from an empty secret",
            );
        }
    }
    ha
}

fn build_standalone(ctx: &mut Ctx, b: &Block) -> StandaloneCluster {
    let f = collect(
        ctx,
        &keys::STANDALONE,
        keys::STANDALONE.name.to_string(),
        &b.items,
        &["cluster-peer"],
    );
    let mut sc = StandaloneCluster::default();
    if let Some(v) = f.uint(ctx, "standalone-group-id", 0, 255) {
        sc.standalone_group_id = v;
    }
    if let Some(v) = f.uint(ctx, "group-member-id", 0, 15) {
        sc.group_member_id = v;
    }
    if let Some(v) = f.choice(
        ctx,
        "layer2-connection",
        &[("available", true), ("unavailable", false)],
        "",
    ) {
        sc.layer2_connection = v;
    }
    if let Some(v) = f.words(ctx, "session-sync-dev", 35) {
        sc.session_sync_dev = v;
    }
    if let Some(v) = f.flag(ctx, "encryption") {
        sc.encryption = v;
    }
    sc.psksecret = f.secret(ctx, "psksecret", 6);
    if sc.encryption && sc.psksecret.is_none() {
        ctx.invalid(b.pos, &f.block, "encryption enable needs psksecret");
    }
    let table = "config system standalone-cluster, config cluster-peer";
    let mut ids: BTreeMap<u32, Pos> = BTreeMap::new();
    let mut ips: BTreeMap<Ipv4Addr, Pos> = BTreeMap::new();
    for sub in &f.subs {
        for e in table_edits(ctx, table, &sub.items) {
            let Some(id) = edit_number(ctx, e, table, &ids) else {
                continue;
            };
            if !first_edit(ctx, &mut ids, &id, e, table) {
                continue;
            }
            let pf = collect(
                ctx,
                &keys::CLUSTER_PEER,
                edit_label(table, e),
                &e.items,
                &[],
            );
            let peervd = pf
                .string(ctx, "peervd", 31)
                .unwrap_or_else(|| "root".to_string());
            let hb_interval = pf.uint(ctx, "hb-interval", 1, 20).unwrap_or(2);
            let hb_lost_threshold = pf.uint(ctx, "hb-lost-threshold", 1, 60).unwrap_or(6);
            match pf.ipv4(ctx, "peerip") {
                Some(ip) if !ip.is_unspecified() => {
                    let pos = pf.value_pos("peerip").unwrap_or(e.pos);
                    if let Some(first) = ips.get(&ip) {
                        ctx.invalid(
                            pos,
                            &pf.block,
                            format!("peerip {ip} is already cluster-peer at line {}", first.line),
                        );
                    } else {
                        ips.insert(ip, pos);
                    }
                    sc.cluster_peers.push(ClusterPeer {
                        peervd,
                        hb_interval,
                        hb_lost_threshold,
                        ..ClusterPeer::new(id, ip)
                    });
                }
                Some(_) => ctx.invalid(
                    pf.value_pos("peerip").unwrap_or(e.pos),
                    &pf.block,
                    "peerip 0.0.0.0 is not a peer address",
                ),
                None if !pf.has("peerip") => {
                    ctx.invalid(e.pos, &pf.block, "cluster-peer needs set peerip <address>");
                }
                None => {}
            }
        }
    }
    sc
}

fn build_phase1(ctx: &mut Ctx, e: &Edit, table: &str) -> (Phase1, P1Pos) {
    let f = collect(ctx, &keys::PHASE1, edit_label(table, e), &e.items, &[]);
    let mut p = Phase1::new(e.name.text.clone());
    let n = e.name.text.chars().count();
    if n == 0 || n > 15 {
        ctx.bad(
            &e.name,
            table,
            "edit",
            "a phase1 name of 1 to 15 characters (it names an interface)",
        );
    }
    if let Some(v) = f.choice(
        ctx,
        "type",
        &[
            ("static", Phase1Type::Static),
            ("dynamic", Phase1Type::Dynamic),
            ("ddns", Phase1Type::Ddns),
        ],
        "",
    ) {
        p.kind = v;
    }
    let iface = f.string(ctx, "interface", 35);
    if let Some(v) = &iface {
        p.interface = v.clone();
    }
    if let Some(v6) = f.choice(ctx, "ip-version", &[("4", false), ("6", true)], "") {
        p.ipv6 = v6;
    }
    let ipv6 = |s: &str| s.parse::<std::net::Ipv6Addr>().ok();
    if p.ipv6 {
        if let Some(v) = f.parse(ctx, "local-gw6", "an IPv6 address", ipv6) {
            p.local_gw6 = Some(v).filter(|a| !a.is_unspecified());
        }
    }
    let rgw6 = if p.ipv6 {
        f.list(ctx, "remote-gw6", "an IPv6 address", ipv6)
    } else {
        None
    };
    if let Some(v) = &rgw6 {
        p.remote_gw6 = v.iter().copied().filter(|a| !a.is_unspecified()).collect();
    }
    let ike = f.choice(ctx, "ike-version", &[("1", 1u8), ("2", 2u8)], "");
    if let Some(v) = ike {
        p.ike_version = v;
    }
    if let Some(v) = f.ipv4(ctx, "local-gw") {
        p.local_gw = ipv4_or_unset(v);
    }
    let rgw = f.list(ctx, "remote-gw", "an IPv4 address", parse_ipv4);
    if let Some(v) = &rgw {
        p.remote_gw = v
            .iter()
            .copied()
            .filter(|ip| !ip.is_unspecified())
            .collect();
    }
    if let Some(v) = f.opt_string(ctx, "remotegw-ddns", 63) {
        p.remotegw_ddns = v;
    }
    if let Some(v) = f.uint(ctx, "keylife", 120, 172_800) {
        p.keylife = v;
    }
    if let Some(v) = f.choice(
        ctx,
        "peertype",
        &[("any", PeerType::Any), ("one", PeerType::One)],
        " (Haven does not implement dialup, peer, peergrp)",
    ) {
        p.peertype = v;
    }
    if let Some(v) = f.opt_string(ctx, "peerid", 255) {
        p.peerid = v;
    }
    if let Some(v) = f.opt_string(ctx, "localid", 63) {
        p.localid = v;
    }
    if let Some(v) = f.choice(
        ctx,
        "localid-type",
        &[
            ("auto", LocalIdType::Auto),
            ("fqdn", LocalIdType::Fqdn),
            ("user-fqdn", LocalIdType::UserFqdn),
            ("keyid", LocalIdType::Keyid),
            ("address", LocalIdType::Address),
            ("asn1dn", LocalIdType::Asn1dn),
        ],
        "",
    ) {
        p.localid_type = v;
    }
    if let Some(v) = f.list(
        ctx,
        "proposal",
        "a phase1 proposal such as aes128-sha256 or aes256gcm-prfsha384",
        |s| parse_proposal(s, true),
    ) {
        p.proposal = v;
    }
    if let Some(v) = f.list(
        ctx,
        "dhgrp",
        "a Diffie-Hellman group: 1 2 5 14 15 16 17 18 19 20 21 27 28 29 30 31 32",
        parse_dhgrp,
    ) {
        p.dhgrp = v;
    }
    if let Some(v) = f.choice(
        ctx,
        "dpd",
        &[
            ("disable", DpdMode::Disable),
            ("on-idle", DpdMode::OnIdle),
            ("on-demand", DpdMode::OnDemand),
            ("periodic", DpdMode::Periodic),
        ],
        "",
    ) {
        p.dpd = v;
    }
    if let Some(v) = f.uint(ctx, "dpd-retrycount", 0, 10) {
        p.dpd_retrycount = v;
    }
    if let Some(values) = f.values("dpd-retryinterval") {
        match values {
            [s] => match parse_uint(&s.text).filter(|v| (1..=3600).contains(v)) {
                Some(v) => p.dpd_retryinterval_ms = u32::try_from(v * 1000).unwrap_or(u32::MAX),
                None => ctx.bad(s, &f.block, "dpd-retryinterval", "seconds 1..=3600"),
            },
            [s, ms] => {
                let secs = parse_uint(&s.text).filter(|v| *v <= 3600);
                let millis = parse_uint(&ms.text).filter(|v| *v <= 999);
                match (secs, millis) {
                    (None, _) => ctx.bad(s, &f.block, "dpd-retryinterval", "seconds 0..=3600"),
                    (_, None) => ctx.bad(ms, &f.block, "dpd-retryinterval", "milliseconds 0..=999"),
                    (Some(a), Some(b)) if a * 1000 + b >= 100 => {
                        p.dpd_retryinterval_ms = u32::try_from(a * 1000 + b).unwrap_or(u32::MAX)
                    }
                    _ => ctx.bad(
                        ms,
                        &f.block,
                        "dpd-retryinterval",
                        "an interval of at least 100 ms",
                    ),
                }
            }
            [_, _, extra, ..] => ctx.bad(
                extra,
                &f.block,
                "dpd-retryinterval",
                "SECONDS or SECONDS MILLISECONDS",
            ),
            [] => {}
        }
    }
    if let Some(v) = f.choice(
        ctx,
        "dpd-backoff",
        &[
            ("fixed", DpdBackoff::Fixed),
            ("exponential", DpdBackoff::Exponential),
        ],
        "",
    ) {
        p.dpd_backoff = v;
    }
    if let Some(v) = seconds_ms(ctx, &f, "dpd-backoff-initial") {
        p.dpd_backoff_initial_ms = v;
    }
    if let Some(v) = seconds_ms(ctx, &f, "dpd-backoff-max") {
        p.dpd_backoff_max_ms = v;
    }
    if p.dpd_backoff == DpdBackoff::Exponential && p.dpd_backoff_max_ms < p.dpd_backoff_initial_ms {
        if let Some(tok) = f.values("dpd-backoff-max").and_then(|v| v.first()) {
            ctx.bad(
                tok,
                &f.block,
                "dpd-backoff-max",
                "a maximum wait not below dpd-backoff-initial",
            );
        } else if let Some(tok) = f.values("dpd-backoff-initial").and_then(|v| v.first()) {
            ctx.bad(
                tok,
                &f.block,
                "dpd-backoff-initial",
                "an initial wait not above dpd-backoff-max (64 s unless set)",
            );
        }
    }
    if let Some(v) = f.flag(ctx, "fgsp-sync") {
        p.fgsp_sync = v;
    }
    if let Some(v) = f.flag(ctx, "ha-sync-esp-seqno") {
        p.ha_sync_esp_seqno = v;
    }
    if let Some(v) = f.choice(
        ctx,
        "nattraversal",
        &[
            ("enable", NatTraversal::Enable),
            ("disable", NatTraversal::Disable),
            ("forced", NatTraversal::Forced),
        ],
        "",
    ) {
        p.nattraversal = v;
    }
    p.psksecret = f.secret(ctx, "psksecret", 6);
    if let Some(v) = f.flag(ctx, "net-device") {
        p.net_device = v;
    }
    if let Some(v) = f.flag(ctx, "add-route") {
        p.add_route = v;
    }
    if let Some(v) = f.flag(ctx, "auto-negotiate") {
        p.auto_negotiate = v;
    }
    if let Some(v) = f.opt_string(ctx, "monitor", 35) {
        p.monitor = v;
    }
    if let Some(v) = f.flag(ctx, "passive-mode") {
        p.passive_mode = v;
    }
    if let Some(v) = f.choice(
        ctx,
        "dpd-action",
        &[
            ("clear", DpdAction::Clear),
            ("hold", DpdAction::Hold),
            ("restart", DpdAction::Restart),
        ],
        "",
    ) {
        p.dpd_action = Some(v);
    }
    let tm_pos = tunnel_monitor(ctx, &f, e, &mut p);
    if let Some(v) = f.uint(ctx, "remote-gw-preempt-interval", 0, 86_400) {
        p.remote_gw_preempt_interval = v;
    }
    if let Some(v) = f.choice(
        ctx,
        "authmethod",
        &[
            ("psk", AuthMethod::Psk),
            ("signature", AuthMethod::Signature),
        ],
        "",
    ) {
        p.authmethod = v;
    }
    if let Some(v) = f.words(ctx, "certificate", 35) {
        p.certificate = v;
    }
    if let Some(v) = f.flag(ctx, "rekey") {
        p.rekey = v;
    }
    if let Some(v) = f.string(ctx, "comments", 255) {
        p.comments = v;
    }

    // Per-entry consistency.
    let label = &f.block;
    if p.interface.is_empty() && (iface.is_some() || !f.has("interface")) {
        ctx.invalid(e.pos, label, "phase1 needs set interface <name>");
    }
    match ike {
        Some(1) => ctx.invalid(
            f.value_pos("ike-version").unwrap_or(e.pos),
            label,
            "IKEv1 is not implemented by Haven: set ike-version 2",
        ),
        None if !f.has("ike-version") => ctx.warn(
            e.pos,
            label,
            "ike-version",
            "not set: FortiOS's default is IKEv1, which Haven does not implement; using IKEv2 \
             (set ike-version 2 to silence this)",
        ),
        _ => {}
    }
    match p.kind {
        Phase1Type::Static
            if p.ipv6 && p.remote_gw6.is_empty() && (rgw6.is_some() || !f.has("remote-gw6")) =>
        {
            ctx.invalid(
                e.pos,
                label,
                "type static with ip-version 6 needs set remote-gw6 <address>",
            );
        }
        Phase1Type::Static
            if !p.ipv6 && p.remote_gw.is_empty() && (rgw.is_some() || !f.has("remote-gw")) =>
        {
            ctx.invalid(e.pos, label, "type static needs set remote-gw <address>");
        }
        Phase1Type::Ddns if p.remotegw_ddns.is_none() => {
            ctx.invalid(e.pos, label, "type ddns needs set remotegw-ddns <name>");
        }
        Phase1Type::Dynamic if !p.remote_gw.is_empty() => {
            ctx.warn(
                f.key_pos("remote-gw").unwrap_or(e.pos),
                label,
                "remote-gw",
                "ignored for type dynamic (peers dial in)",
            );
        }
        _ => {}
    }
    if p.peertype == PeerType::One && p.peerid.is_none() {
        ctx.invalid(e.pos, label, "peertype one needs set peerid <id>");
    }
    match p.authmethod {
        AuthMethod::Psk if p.psksecret.is_none() && !f.has("psksecret") => {
            ctx.invalid(e.pos, label, "authmethod psk needs set psksecret <key>");
        }
        AuthMethod::Signature if p.certificate.is_empty() => {
            ctx.invalid(
                e.pos,
                label,
                "authmethod signature needs set certificate <name>",
            );
        }
        _ => {}
    }
    let pos = P1Pos {
        edit: e.pos,
        monitor: f.value_pos("monitor"),
        tunnel_monitor: tm_pos,
    };
    (p, pos)
}

fn selector(ctx: &mut Ctx, f: &Fields<'_>, e: &Edit, side: &str) -> Selector {
    let k_type = format!("{side}-addr-type");
    let k_subnet = format!("{side}-subnet");
    let k_start = format!("{side}-start-ip");
    let k_end = format!("{side}-end-ip");
    let k_subnet6 = format!("{side}-subnet6");
    let k_start6 = format!("{side}-start-ip6");
    #[derive(Clone, Copy, PartialEq)]
    enum T {
        Subnet,
        Range,
        Ip,
        Subnet6,
        Ip6,
    }
    let t = f
        .choice(
            ctx,
            &k_type,
            &[
                ("subnet", T::Subnet),
                ("range", T::Range),
                ("ip", T::Ip),
                ("subnet6", T::Subnet6),
                ("ip6", T::Ip6),
            ],
            " (Haven does not implement named addresses or IPv6 ranges)",
        )
        .unwrap_or(T::Subnet);
    let subnet = f.net(ctx, &k_subnet);
    let start = f.ipv4(ctx, &k_start);
    let end = f.ipv4(ctx, &k_end);
    let ignored = |ctx: &mut Ctx, key: &str, ty: &str| {
        if let Some(pos) = f.key_pos(key) {
            ctx.warn(pos, &f.block, key, format!("ignored with {k_type} {ty}"));
        }
    };
    match t {
        // `*-subnet6` is read only for `subnet6` (FortiOS lists it, with `::/0`, for every
        // selector); `*-start-ip6` only for `ip6`.
        T::Subnet6 => {
            let (addr, prefix_len) = f
                .net6(ctx, &k_subnet6)
                .unwrap_or((Ipv6Addr::UNSPECIFIED, 0));
            Selector::Subnet6 { addr, prefix_len }
        }
        T::Ip6 => {
            let ipv6 = |s: &str| s.parse::<Ipv6Addr>().ok();
            match f.parse(ctx, &k_start6, "an IPv6 address", ipv6) {
                Some(addr) => Selector::Subnet6 {
                    addr,
                    prefix_len: 128,
                },
                None => {
                    if !f.has(&k_start6) {
                        ctx.invalid(e.pos, &f.block, format!("{k_type} ip6 needs {k_start6}"));
                    }
                    Selector::Subnet6 {
                        addr: Ipv6Addr::UNSPECIFIED,
                        prefix_len: 0,
                    }
                }
            }
        }
        T::Subnet => {
            ignored(ctx, &k_start, "subnet");
            ignored(ctx, &k_end, "subnet");
            Selector::Subnet(subnet.unwrap_or(Ipv4Net::ANY))
        }
        T::Ip => {
            ignored(ctx, &k_subnet, "ip");
            ignored(ctx, &k_end, "ip");
            match start {
                Some(ip) => Selector::Ip(ip),
                None => {
                    if !f.has(&k_start) {
                        ctx.invalid(e.pos, &f.block, format!("{k_type} ip needs {k_start}"));
                    }
                    Selector::Subnet(Ipv4Net::ANY)
                }
            }
        }
        T::Range => {
            ignored(ctx, &k_subnet, "range");
            match (start, end) {
                (Some(s), Some(en)) => {
                    if u32::from(s) > u32::from(en) {
                        ctx.invalid(
                            f.value_pos(&k_end).unwrap_or(e.pos),
                            &f.block,
                            format!("{k_end} {en} is before {k_start} {s}"),
                        );
                    }
                    Selector::Range { start: s, end: en }
                }
                _ => {
                    if !f.has(&k_start) || !f.has(&k_end) {
                        ctx.invalid(
                            e.pos,
                            &f.block,
                            format!("{k_type} range needs {k_start} and {k_end}"),
                        );
                    }
                    Selector::Subnet(Ipv4Net::ANY)
                }
            }
        }
    }
}

fn build_phase2(ctx: &mut Ctx, e: &Edit, table: &str) -> (Phase2, P2Pos) {
    let f = collect(ctx, &keys::PHASE2, edit_label(table, e), &e.items, &[]);
    let n = e.name.text.chars().count();
    if n == 0 || n > 35 {
        ctx.bad(
            &e.name,
            table,
            "edit",
            "a phase2 name of 1 to 35 characters",
        );
    }
    let phase1name = f.string(ctx, "phase1name", 35).unwrap_or_default();
    let mut p = Phase2::new(e.name.text.clone(), phase1name);
    if let Some(v) = f.list(
        ctx,
        "proposal",
        "a phase2 proposal such as aes128-sha1 or aes256gcm",
        |s| parse_proposal(s, false),
    ) {
        p.proposal = v;
    }
    if let Some(v) = f.flag(ctx, "pfs") {
        p.pfs = v;
    }
    if let Some(v) = f.list(
        ctx,
        "dhgrp",
        "a Diffie-Hellman group: 1 2 5 14 15 16 17 18 19 20 21 27 28 29 30 31 32",
        parse_dhgrp,
    ) {
        p.dhgrp = v;
    }
    if let Some(v) = f.choice(
        ctx,
        "keylife-type",
        &[
            ("seconds", KeylifeType::Seconds),
            ("kbs", KeylifeType::Kbs),
            ("both", KeylifeType::Both),
        ],
        "",
    ) {
        p.keylife_type = v;
    }
    if let Some(v) = f.uint(ctx, "keylifeseconds", 120, 172_800) {
        p.keylifeseconds = v;
    }
    if let Some(v) = f.uint(ctx, "keylifekbs", 5120, u64::from(u32::MAX)) {
        p.keylifekbs = v;
    }
    p.src = selector(ctx, &f, e, "src");
    p.dst = selector(ctx, &f, e, "dst");
    let v6 = |s: &Selector| matches!(s, Selector::Subnet6 { .. });
    if v6(&p.src) != v6(&p.dst) {
        ctx.invalid(
            e.pos,
            &f.block,
            "src-addr-type and dst-addr-type must be both IPv4 (subnet, range, ip) or both \
             IPv6 (subnet6, ip6)",
        );
    }
    if let Some(v) = f.uint(ctx, "protocol", 0, 255) {
        p.protocol = v;
    }
    if let Some(v) = f.uint(ctx, "src-port", 0, 65535) {
        p.src_port = v;
    }
    if let Some(v) = f.uint(ctx, "dst-port", 0, 65535) {
        p.dst_port = v;
    }
    if let Some(v) = f.flag(ctx, "auto-negotiate") {
        p.auto_negotiate = v;
    }
    if let Some(v) = f.flag(ctx, "keepalive") {
        p.keepalive = v;
    }
    if let Some(v) = f.flag(ctx, "replay") {
        p.replay = v;
    }
    let _ = f.choice(
        ctx,
        "encapsulation",
        &[("tunnel-mode", ())],
        " (Haven does not implement transport-mode)",
    );
    if let Some(v) = f.string(ctx, "comments", 255) {
        p.comments = v;
    }
    if !f.has("phase1name") {
        ctx.invalid(e.pos, &f.block, "phase2 needs set phase1name <phase1>");
    }
    let pos = P2Pos {
        edit: e.pos,
        phase1name: f.value_pos("phase1name"),
    };
    (p, pos)
}

/// Encryption key bytes of the manual-key `enc-alg` values Haven
/// implements; `None` for the others.
fn manual_enc_key_len(e: Encryption) -> Option<usize> {
    match e {
        // AES-CBC key sizes (RFC 3602 §2.2).
        Encryption::Aes128 => Some(16),
        Encryption::Aes256 => Some(32),
        // The AES key then a 4-byte salt (RFC 4106 §8.1).
        Encryption::Aes128Gcm => Some(16 + 4),
        Encryption::Aes256Gcm => Some(32 + 4),
        // A 256-bit key then a 4-byte salt (RFC 7634 §4).
        Encryption::Chacha20Poly1305 => Some(32 + 4),
        _ => None,
    }
}

/// HMAC key bytes of the manual-key `auth-alg` values Haven implements
/// (the hash output size, RFC 2404 §3, RFC 4868 §2.1.1); `None` for the
/// others.
fn manual_auth_key_len(h: Hash) -> Option<usize> {
    match h {
        Hash::Sha1 => Some(20),
        Hash::Sha256 => Some(32),
        Hash::Sha512 => Some(64),
        Hash::Md5 | Hash::Sha384 => None,
    }
}

const MANUAL_ENC_IMPLEMENTED: &str = "aes128, aes256 (CBC, with an auth-alg), \
     aes128gcm, aes256gcm, chacha20poly1305 (Haven extensions, no auth-alg)";

/// Longest key text accepted (a sha512 key is 128 hex digits and 7 dashes).
const MAX_HEX_KEY_CHARS: usize = 512;

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decode a manual key: hex digits with an optional `0x`, in groups joined
/// by `-` as FortiOS writes them (`0102030405060708-1112131415161718`) or in
/// one run. Each group has an even number of digits. The partial buffer is
/// wiped when the text does not decode.
fn parse_hex_key(s: &str) -> Option<Secret> {
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if s.is_empty() || s.len() > MAX_HEX_KEY_CHARS {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 2);
    let mut ok = true;
    'groups: for group in s.split('-') {
        if group.is_empty() || group.len() % 2 != 0 {
            ok = false;
            break;
        }
        for pair in group.as_bytes().chunks(2) {
            match pair {
                [h, l] => match (hex_digit(*h), hex_digit(*l)) {
                    (Some(h), Some(l)) => out.push(h << 4 | l),
                    _ => {
                        ok = false;
                        break 'groups;
                    }
                },
                _ => {
                    ok = false;
                    break 'groups;
                }
            }
        }
    }
    let secret = Secret::new(out);
    ok.then_some(secret)
}

/// Why an SPI value is refused.
enum SpiError {
    Format,
    Reserved,
}

/// A FortiOS SPI: hexadecimal, with or without `0x`, at most 8 digits, at
/// least [`MANUALKEY_MIN_SPI`].
fn parse_spi(s: &str) -> Result<u32, SpiError> {
    let h = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if h.is_empty() || h.len() > 8 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SpiError::Format);
    }
    let v = u32::from_str_radix(h, 16).map_err(|_| SpiError::Format)?;
    if v < MANUALKEY_MIN_SPI {
        return Err(SpiError::Reserved);
    }
    Ok(v)
}

impl Fields<'_> {
    fn spi(&self, ctx: &mut Ctx, key: &str) -> Option<u32> {
        let tok = self.single(ctx, key)?;
        match parse_spi(&tok.text) {
            Ok(v) => Some(v),
            Err(SpiError::Format) => {
                ctx.bad(
                    tok,
                    &self.block,
                    key,
                    "a hexadecimal SPI of at most 8 digits, such as 0x1001 or 1001",
                );
                None
            }
            Err(SpiError::Reserved) => {
                ctx.bad(
                    tok,
                    &self.block,
                    key,
                    "an SPI of at least 0x100: RFC 4303 §2.1 reserves 0 to 0xff",
                );
                None
            }
        }
    }

    /// A hex key of exactly `want` bytes (when the algorithm is known).
    /// Values are never echoed in diagnostics.
    fn hex_key(&self, ctx: &mut Ctx, key: &str, want: Option<(usize, &str)>) -> Option<Secret> {
        let values = self.values(key)?;
        let bad = |ctx: &mut Ctx, tok: &Tok, expected: String| {
            ctx.error(
                tok.pos,
                &self.block,
                ErrorKind::BadValue {
                    key: key.to_string(),
                    value: crate::REDACTED.into(),
                    expected,
                },
            );
        };
        let tok = match values {
            [one] => one,
            [enc, _, ..] if !enc.quoted && enc.text == "ENC" => {
                bad(
                    ctx,
                    enc,
                    "the key in hex: a FortiOS-encrypted key (ENC …) cannot be decrypted by Haven"
                        .into(),
                );
                return None;
            }
            [_, extra, ..] => {
                bad(ctx, extra, "a single hex value".into());
                return None;
            }
            [] => return None,
        };
        if tok.text.len() >= 3 && tok.text.chars().all(|c| c == '*') {
            bad(
                ctx,
                tok,
                "the key in hex: a masked placeholder (********) cannot be used".into(),
            );
            return None;
        }
        let format = "hex digits, optionally 0x-prefixed, in groups joined by '-' \
                      (FortiOS: 16-digit groups such as 0102030405060708-1112131415161718)";
        let Some(secret) = parse_hex_key(&tok.text) else {
            let expected = match want {
                Some((n, alg)) => format!("{n} bytes ({} hex digits) for {alg}: {format}", n * 2),
                None => format.to_string(),
            };
            bad(ctx, tok, expected);
            return None;
        };
        match want {
            Some((n, alg)) if secret.len() != n => {
                bad(
                    ctx,
                    tok,
                    format!(
                        "{n} bytes ({} hex digits) for {alg}, found {} bytes",
                        n * 2,
                        secret.len()
                    ),
                );
                None
            }
            _ => Some(secret),
        }
    }
}

fn build_manualkey(ctx: &mut Ctx, e: &Edit, table: &str) -> Option<(ManualKey, MkPos)> {
    let f = collect(ctx, &keys::MANUALKEY, edit_label(table, e), &e.items, &[]);
    let label = f.block.clone();
    let n = e.name.text.chars().count();
    let mut ok = true;
    if n == 0 || n > 15 {
        ctx.bad(
            &e.name,
            table,
            "edit",
            "a manualkey-interface name of 1 to 15 characters (it names an interface)",
        );
        ok = false;
    }
    let iface = f.string(ctx, "interface", 35);
    let interface = iface.clone().unwrap_or_default();
    if interface.is_empty() && (iface.is_some() || !f.has("interface")) {
        ctx.invalid(
            e.pos,
            &label,
            "manualkey-interface needs set interface <name>",
        );
        ok = false;
    }
    // `ip-version` is the outer (gateway) address family, `addr-type` the inner one.
    let v6 = f.choice(ctx, "ip-version", &[("4", false), ("6", true)], "") == Some(true);
    let inner6 = f.choice(ctx, "addr-type", &[("4", false), ("6", true)], "") == Some(true);
    let ipv6 = |s: &str| s.parse::<std::net::Ipv6Addr>().ok();
    let local_gw6 = if v6 {
        f.parse(ctx, "local-gw6", "an IPv6 address", ipv6)
            .filter(|a| !a.is_unspecified())
    } else {
        None
    };
    let remote_gw6 = if v6 {
        match f.parse(ctx, "remote-gw6", "an IPv6 address", ipv6) {
            Some(a) if !a.is_unspecified() => Some(a),
            Some(_) => {
                ctx.invalid(
                    f.value_pos("remote-gw6").unwrap_or(e.pos),
                    &label,
                    "remote-gw6 :: is not a peer address",
                );
                ok = false;
                None
            }
            None => {
                if !f.has("remote-gw6") {
                    ctx.invalid(
                        e.pos,
                        &label,
                        "manualkey-interface with ip-version 6 needs set remote-gw6 <address>",
                    );
                }
                ok = false;
                None
            }
        }
    } else {
        None
    };
    let local_gw = f.ipv4(ctx, "local-gw").and_then(ipv4_or_unset);
    let remote_gw = match f.ipv4(ctx, "remote-gw") {
        _ if v6 => Some(Ipv4Addr::UNSPECIFIED),
        Some(ip) if !ip.is_unspecified() => Some(ip),
        Some(_) => {
            ctx.invalid(
                f.value_pos("remote-gw").unwrap_or(e.pos),
                &label,
                "remote-gw 0.0.0.0 is not a peer address",
            );
            None
        }
        None => {
            if !f.has("remote-gw") {
                ctx.invalid(
                    e.pos,
                    &label,
                    "manualkey-interface needs set remote-gw <address>",
                );
            }
            None
        }
    };

    // enc-alg: every FortiOS value and Haven's AEAD extensions parse; only
    // the ones the datapath implements are accepted.
    let enc = match f.single(ctx, "enc-alg") {
        Some(tok) => match lookup(&Encryption::ALL, &tok.text) {
            Some(e) if manual_enc_key_len(e).is_some() => Some(e),
            Some(_) => {
                ctx.bad(
                    tok,
                    &label,
                    "enc-alg",
                    format!(
                        "an algorithm Haven implements: {MANUAL_ENC_IMPLEMENTED} \
                         (FortiOS's null, des, 3des, aes192, aria and seed are not implemented)"
                    ),
                );
                None
            }
            None => {
                let names: Vec<&str> = Encryption::ALL.iter().map(|(n, _)| *n).collect();
                ctx.bad(
                    tok,
                    &label,
                    "enc-alg",
                    format!("one of {}", names.join(", ")),
                );
                None
            }
        },
        None => {
            if !f.has("enc-alg") {
                ctx.invalid(
                    e.pos,
                    &label,
                    format!(
                        "manualkey-interface needs set enc-alg <{}> (FortiOS's default null is not \
                         implemented)",
                        "aes128|aes256|aes128gcm|aes256gcm|chacha20poly1305"
                    ),
                );
            }
            None
        }
    };
    // auth-alg: Some(None) is `null`.
    let auth: Option<Option<Hash>> = match f.single(ctx, "auth-alg") {
        Some(tok) if tok.text == "null" => Some(None),
        Some(tok) => match lookup(&Hash::ALL, &tok.text) {
            Some(h) if manual_auth_key_len(h).is_some() => Some(Some(h)),
            Some(_) => {
                ctx.bad(
                    tok,
                    &label,
                    "auth-alg",
                    "an algorithm Haven implements: sha1, sha256, sha512 \
                     (md5 and sha384 are not implemented)",
                );
                None
            }
            None => {
                ctx.bad(
                    tok,
                    &label,
                    "auth-alg",
                    "one of null, md5, sha1, sha256, sha384, sha512",
                );
                None
            }
        },
        None => None,
    };
    let auth_ok = !f.has("auth-alg") || auth.is_some();
    let mut hash = None;
    if let Some(enc) = enc {
        if enc.is_aead() {
            if let Some(Some(h)) = auth {
                let at = f.value_pos("auth-alg").unwrap_or(e.pos);
                ctx.invalid(
                    at,
                    &label,
                    format!(
                        "auth-alg {} with enc-alg {}: a combined-mode cipher authenticates by \
                         itself; set auth-alg null or leave it unset",
                        h.name(),
                        enc.name()
                    ),
                );
                ok = false;
            }
            if let Some(at) = f.key_pos("auth-key") {
                ctx.warn(
                    at,
                    &label,
                    "auth-key",
                    format!("ignored with enc-alg {} (no auth-alg)", enc.name()),
                );
            }
        } else {
            match auth {
                Some(Some(h)) => hash = Some(h),
                _ if auth_ok => {
                    ctx.invalid(
                        f.value_pos("auth-alg").unwrap_or(e.pos),
                        &label,
                        format!(
                            "enc-alg {} needs set auth-alg sha1|sha256|sha512 (ESP without \
                             integrity is not implemented)",
                            enc.name()
                        ),
                    );
                    ok = false;
                }
                _ => {}
            }
        }
    }

    let enc_want =
        enc.and_then(|e| Some((manual_enc_key_len(e)?, format!("enc-alg {}", e.name()))));
    let enc_key = f.hex_key(
        ctx,
        "enc-key",
        enc_want.as_ref().map(|(n, a)| (*n, a.as_str())),
    );
    if enc_key.is_none() && !f.has("enc-key") {
        ctx.invalid(e.pos, &label, "manualkey-interface needs set enc-key <hex>");
    }
    let auth_key = if enc.is_some_and(Encryption::is_aead) {
        None
    } else {
        let want =
            hash.and_then(|h| Some((manual_auth_key_len(h)?, format!("auth-alg {}", h.name()))));
        let k = f.hex_key(
            ctx,
            "auth-key",
            want.as_ref().map(|(n, a)| (*n, a.as_str())),
        );
        if k.is_none() && hash.is_some() && !f.has("auth-key") {
            ctx.invalid(e.pos, &label, "auth-alg needs set auth-key <hex>");
        }
        k
    };

    let local_spi = f.spi(ctx, "local-spi");
    let remote_spi = f.spi(ctx, "remote-spi");
    for (key, v) in [("local-spi", local_spi), ("remote-spi", remote_spi)] {
        if v.is_none() && !f.has(key) {
            ctx.invalid(
                e.pos,
                &label,
                format!("manualkey-interface needs set {key} <hex SPI of at least 0x100>"),
            );
        }
    }
    let encapsulation = f
        .choice(
            ctx,
            "encapsulation",
            &[("none", ManualEncap::None), ("udp", ManualEncap::Udp)],
            " (Haven extension: raw ESP or RFC 3948 UDP on port 4500)",
        )
        .unwrap_or(ManualEncap::None);
    let replay = f.flag(ctx, "replay").unwrap_or(true);
    let src_subnet = f.net(ctx, "src-subnet").unwrap_or(Ipv4Net::ANY);
    let dst_subnet = f.net(ctx, "dst-subnet").unwrap_or(Ipv4Net::ANY);
    let subnets6 = inner6.then(|| {
        let any = (Ipv6Addr::UNSPECIFIED, 0);
        (
            f.net6(ctx, "src-subnet6").unwrap_or(any),
            f.net6(ctx, "dst-subnet6").unwrap_or(any),
        )
    });
    if !inner6 {
        for key in ["src-subnet6", "dst-subnet6"] {
            if let Some(pos) = f.key_pos(key) {
                ctx.warn(pos, &f.block, key, "ignored with addr-type 4");
            }
        }
    }

    let (Some(remote_gw), Some(encryption), Some(enc_key), Some(local_spi), Some(remote_spi)) =
        (remote_gw, enc, enc_key, local_spi, remote_spi)
    else {
        return None;
    };
    if !ok || (hash.is_some() && auth_key.is_none()) {
        return None;
    }
    let pos = MkPos {
        edit: e.pos,
        local_spi: f.value_pos("local-spi"),
    };
    Some((
        ManualKey {
            name: e.name.text.clone(),
            interface,
            local_gw,
            remote_gw,
            proposal: Proposal {
                encryption,
                hash,
                ike: false,
            },
            enc_key,
            auth_key,
            local_spi,
            remote_spi,
            encapsulation,
            replay,
            src_subnet,
            dst_subnet,
            local_gw6,
            remote_gw6,
            subnets6,
        },
        pos,
    ))
}

fn build_route(ctx: &mut Ctx, e: &Edit, table: &str, seq_num: u32) -> Route {
    let f = collect(ctx, &keys::ROUTE, edit_label(table, e), &e.items, &[]);
    let mut r = Route::new(seq_num);
    if let Some(v) = f.flag(ctx, "status") {
        r.status = v;
    }
    if let Some(v) = f.net(ctx, "dst") {
        r.dst = v;
    }
    if let Some(v) = f.ipv4(ctx, "gateway") {
        r.gateway = ipv4_or_unset(v);
    }
    if let Some(v) = f.opt_string(ctx, "device", 35) {
        r.device = v;
    }
    if let Some(v) = f.uint(ctx, "distance", 1, 255) {
        r.distance = v;
    }
    if let Some(v) = f.uint(ctx, "priority", 0, u64::from(u32::MAX)) {
        r.priority = v;
    }
    if let Some(v) = f.flag(ctx, "blackhole") {
        r.blackhole = v;
    }
    if let Some(v) = f.string(ctx, "comment", 255) {
        r.comment = v;
    }
    if r.device.is_none() && !r.blackhole && !f.has("device") {
        ctx.invalid(
            e.pos,
            &f.block,
            "static route needs set device <interface> or set blackhole enable",
        );
    }
    if r.blackhole && (r.device.is_some() || r.gateway.is_some()) {
        ctx.warn(
            e.pos,
            &f.block,
            "blackhole",
            "blackhole route: device and gateway are ignored",
        );
    }
    r
}

/// `ADDRESS MASK` or `ADDRESS/LENGTH`, host bits kept (an interface address).
fn parse_if_addr(values: &[Tok]) -> Result<(Ipv4Addr, u8), &Tok> {
    match values {
        [one] => {
            let (a, l) = one.text.split_once('/').ok_or(one)?;
            let len = parse_uint(l)
                .filter(|v| *v <= 32)
                .and_then(|v| u8::try_from(v).ok());
            match (parse_ipv4(a), len) {
                (Some(a), Some(l)) => Ok((a, l)),
                _ => Err(one),
            }
        }
        [a, m] => {
            let addr = parse_ipv4(&a.text).ok_or(a)?;
            let mask = parse_ipv4(&m.text).map(u32::from).ok_or(m)?;
            let l = u8::try_from(mask.leading_ones()).map_err(|_| m)?;
            if prefix_mask(l) != mask {
                return Err(m);
            }
            Ok((addr, l))
        }
        [_, _, extra, ..] => Err(extra),
        // An empty `set ip` is a syntax error reported by the syntax layer; treat as unset.
        [] => Ok((Ipv4Addr::UNSPECIFIED, 0)),
    }
}

/// One `config system interface` entry. FortiOS interfaces have hundreds of keys: Haven
/// reads `ip` and `type` and accepts every other key and nested block with a warning
/// (a full backup must load).
fn build_interface(ctx: &mut Ctx, e: &Edit, table: &str) -> Interface {
    let block = edit_label(table, e);
    let mut i = Interface {
        name: e.name.text.clone(),
        ip: None,
        loopback: false,
    };
    for item in &e.items {
        match item {
            Item::Set { key, values } if key.text == "ip" => match parse_if_addr(values) {
                Ok((a, l)) => i.ip = (!a.is_unspecified()).then_some((a, l)),
                Err(tok) => ctx.bad(tok, &block, "ip", "ADDRESS MASK or ADDRESS/LENGTH"),
            },
            Item::Unset { key } if key.text == "ip" => i.ip = None,
            Item::Set { key, values } if key.text == "type" => match values.as_slice() {
                [v] => i.loopback = v.text == "loopback",
                [_, extra, ..] => ctx.bad(extra, &block, "type", "one interface type"),
                [] => {}
            },
            Item::Unset { key } if key.text == "type" => i.loopback = false,
            Item::Set { key, .. } | Item::Unset { key } => {
                ctx.warn(key.pos, &block, &key.text, NOT_IMPLEMENTED);
            }
            Item::Config(b) => ctx.warn(
                b.pos,
                &block,
                "",
                format!(
                    "nested block \"config {}\" is not implemented by Haven; ignored",
                    b.path_string()
                ),
            ),
            Item::Edit(x) => {
                ctx.invalid(x.pos, &block, "expected set, unset or config, found edit")
            }
        }
    }
    i
}

fn top_block(ctx: &mut Ctx, st: &mut State, b: &Block) {
    let words: Vec<&str> = b.path.iter().map(|t| t.text.as_str()).collect();
    let path = b.path_string();
    match words.as_slice() {
        ["system", "ha"] => {
            if let Some(first) = st.ha_pos {
                ctx.invalid(
                    b.pos,
                    "",
                    format!(
                        "config system ha appears twice (first at line {})",
                        first.line
                    ),
                );
                return;
            }
            st.ha_pos = Some(b.pos);
            st.config.ha = Some(build_ha(ctx, b));
        }
        ["system", "standalone-cluster"] => {
            if let Some(first) = st.sa_pos {
                ctx.invalid(
                    b.pos,
                    "",
                    format!(
                        "config system standalone-cluster appears twice (first at line {})",
                        first.line
                    ),
                );
                return;
            }
            st.sa_pos = Some(b.pos);
            st.config.standalone = Some(build_standalone(ctx, b));
        }
        ["vpn", "ipsec", "phase1-interface"] => {
            let table = keys::PHASE1.name;
            for e in table_edits(ctx, table, &b.items) {
                if !first_edit(ctx, &mut st.p1_names, &e.name.text, e, table) {
                    continue;
                }
                let (p, pos) = build_phase1(ctx, e, table);
                st.config.phase1.push(p);
                st.p1.push(pos);
            }
        }
        ["vpn", "ipsec", "phase2-interface"] => {
            let table = keys::PHASE2.name;
            for e in table_edits(ctx, table, &b.items) {
                if !first_edit(ctx, &mut st.p2_names, &e.name.text, e, table) {
                    continue;
                }
                let (p, pos) = build_phase2(ctx, e, table);
                st.config.phase2.push(p);
                st.p2.push(pos);
            }
        }
        ["vpn", "ipsec", "manualkey-interface"] => {
            let table = keys::MANUALKEY.name;
            for e in table_edits(ctx, table, &b.items) {
                if !first_edit(ctx, &mut st.mk_names, &e.name.text, e, table) {
                    continue;
                }
                if let Some((m, pos)) = build_manualkey(ctx, e, table) {
                    st.config.manualkey.push(m);
                    st.mk.push(pos);
                }
            }
        }
        ["system", "interface"] => {
            let table = "config system interface";
            for e in table_edits(ctx, table, &b.items) {
                if !first_edit(ctx, &mut st.if_names, &e.name.text, e, table) {
                    continue;
                }
                let i = build_interface(ctx, e, table);
                st.config.interfaces.push(i);
            }
        }
        ["router", "static"] => {
            let table = keys::ROUTE.name;
            for e in table_edits(ctx, table, &b.items) {
                let Some(n) = edit_number(ctx, e, table, &st.route_ids) else {
                    continue;
                };
                if !first_edit(ctx, &mut st.route_ids, &n, e, table) {
                    continue;
                }
                let r = build_route(ctx, e, table, n);
                st.config.routes.push(r);
            }
        }
        ["global"] => walk(ctx, st, &b.items, "config global"),
        ["vdom"] => {
            let edits = table_edits(ctx, "config vdom", &b.items);
            if edits.len() > 1 {
                ctx.warn(
                    b.pos,
                    "config vdom",
                    "",
                    "Haven has no VDOMs: the blocks of every VDOM are read as one",
                );
            }
            for e in edits {
                walk(ctx, st, &e.items, "config vdom");
            }
        }
        _ => ignored_or_unknown(ctx, b, &words, &path),
    }
}

fn ignored_or_unknown(ctx: &mut Ctx, b: &Block, words: &[&str], path: &str) {
    let ours = || {
        keys::OURS
            .iter()
            .map(|p| format!("config {p}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let unknown = |ctx: &mut Ctx, expected: String| {
        ctx.error(
            b.pos,
            "",
            ErrorKind::UnknownBlock {
                path: path.to_string(),
                expected,
            },
        );
    };
    let ignored = |ctx: &mut Ctx| {
        ctx.warn(
            b.pos,
            &format!("config {path}"),
            "",
            "FortiOS block not implemented by Haven; ignored",
        );
    };
    let hint = keys::suggest(path, keys::OURS.iter().copied());
    match words {
        ["vpn", "ipsec", t] if keys::VPN_IPSEC.contains(t) => ignored(ctx),
        ["vpn", "ipsec", ..] => unknown(
            ctx,
            match hint {
                Some(h) => format!("did you mean config {h}?"),
                None => format!("expected config vpn ipsec {}", keys::VPN_IPSEC.join("|")),
            },
        ),
        ["router", t] if keys::ROUTER.contains(t) => ignored(ctx),
        ["router", ..] => unknown(
            ctx,
            match hint {
                Some(h) => format!("did you mean config {h}?"),
                None => format!("expected config router {}", keys::ROUTER.join("|")),
            },
        ),
        _ if hint.is_some() => unknown(
            ctx,
            format!("did you mean config {}?", hint.unwrap_or_default()),
        ),
        [first, ..] if keys::FORTIOS_TOP.contains(first) => ignored(ctx),
        _ => unknown(ctx, format!("not a FortiOS block; Haven reads {}", ours())),
    }
}

fn walk(ctx: &mut Ctx, st: &mut State, items: &[Item], label: &str) {
    for item in items {
        match item {
            Item::Config(b) => top_block(ctx, st, b),
            // The syntax layer already reported these at the top level.
            Item::Edit(_) | Item::Set { .. } | Item::Unset { .. } if label.is_empty() => {}
            Item::Edit(e) => ctx.invalid(e.pos, label, "expected config, found edit"),
            Item::Set { key, .. } | Item::Unset { key } => ctx.error(
                key.pos,
                label,
                ErrorKind::UnknownKey {
                    key: key.text.clone(),
                    block: label.to_string(),
                    expected: "expected config blocks only".into(),
                },
            ),
        }
    }
}

/// Cross-block checks.
fn validate(ctx: &mut Ctx, st: &State) {
    let cfg = &st.config;
    validate_fgcp_over_fgsp(ctx, st);
    // Name indexes keep the cross-checks linear on large files.
    let p1_by_name: BTreeMap<&str, &Phase1> =
        cfg.phase1.iter().map(|p| (p.name.as_str(), p)).collect();
    let used: std::collections::BTreeSet<&str> =
        cfg.phase2.iter().map(|p| p.phase1name.as_str()).collect();
    for (p2, pos) in cfg.phase2.iter().zip(&st.p2) {
        if !p2.phase1name.is_empty() && !p1_by_name.contains_key(p2.phase1name.as_str()) {
            let hint = if st.mk_names.contains_key(&p2.phase1name) {
                " (it names a manualkey-interface, which takes no phase2)"
            } else {
                ""
            };
            ctx.invalid(
                pos.phase1name.unwrap_or(pos.edit),
                &format!("{}, edit \"{}\"", keys::PHASE2.name, p2.name),
                format!(
                    "phase1name \"{}\" does not name a config vpn ipsec phase1-interface \
                     entry{hint}",
                    p2.phase1name
                ),
            );
        }
        if let Some(p1) = p1_by_name.get(p2.phase1name.as_str()) {
            if p2.keylife_type != KeylifeType::Kbs && p2.keylifeseconds >= p1.keylife {
                ctx.warn(
                    pos.edit,
                    &format!("{}, edit \"{}\"", keys::PHASE2.name, p2.name),
                    "keylifeseconds",
                    format!(
                        "phase2 lifetime {} s is not shorter than phase1 \"{}\" keylife {} s",
                        p2.keylifeseconds, p1.name, p1.keylife
                    ),
                );
            }
        }
    }
    for (p1, pos) in cfg.phase1.iter().zip(&st.p1) {
        let label = format!("{}, edit \"{}\"", keys::PHASE1.name, p1.name);
        if let Some(m) = &p1.monitor {
            let at = pos.monitor.unwrap_or(pos.edit);
            if *m == p1.name {
                ctx.invalid(at, &label, "monitor names the phase1 itself");
            } else if !p1_by_name.contains_key(m.as_str()) {
                ctx.invalid(
                    at,
                    &label,
                    format!("monitor \"{m}\" does not name a phase1-interface entry"),
                );
            }
        }
        if let Some(m) = &p1.tunnel_monitor {
            let p2s: Vec<&Phase2> = cfg.phase2_for(&p1.name).collect();
            let (src_at, dst_at) = pos.tunnel_monitor;
            if !p2s.is_empty() && !p2s.iter().any(|p2| selector_contains(&p2.src, m.source)) {
                ctx.warn(
                    src_at.unwrap_or(pos.edit),
                    &label,
                    "tunnel-monitor-source-ip",
                    format!(
                        "{} is in no src selector of this phase1's phase2s: the peer will drop \
                         the probes",
                        m.source
                    ),
                );
            }
            if !p2s.is_empty()
                && !p2s
                    .iter()
                    .any(|p2| selector_contains(&p2.dst, m.destination))
            {
                ctx.warn(
                    dst_at.unwrap_or(pos.edit),
                    &label,
                    "tunnel-monitor-destination-ip",
                    format!(
                        "{} is in no dst selector of this phase1's phase2s: no SA carries the \
                         probes",
                        m.destination
                    ),
                );
            }
        }
        if p1.fgsp_sync && cfg.standalone.is_none() {
            ctx.warn(
                pos.edit,
                &label,
                "fgsp-sync",
                "fgsp-sync enable without config system standalone-cluster: nothing to sync with",
            );
        }
        if !used.contains(p1.name.as_str()) {
            ctx.warn(pos.edit, &label, "", "no phase2-interface uses this phase1");
        }
    }
}

/// An FGCP pair that is also an FGSP peer (seed 001): its failover must be over before the
/// other clusters declare it lost, or they take its tunnels over as well. The partner
/// takes over after `hb-interval` x `hb-lost-threshold` of `config system ha`; the FGSP
/// peers give up after `hb-interval` x `hb-lost-threshold` of their `cluster-peer` entry.
fn validate_fgcp_over_fgsp(ctx: &mut Ctx, st: &State) {
    let cfg = &st.config;
    let (Some(ha), Some(sa), Some(pos)) = (&cfg.ha, &cfg.standalone, st.ha_pos) else {
        return;
    };
    if ha.mode != HaMode::ActivePassive {
        return;
    }
    let Some(fgsp_ms) = sa
        .cluster_peers
        .iter()
        .map(ClusterPeer::lost_after_ms)
        .min()
    else {
        return;
    };
    let fgcp_ms = ha
        .hb_interval_ms()
        .saturating_mul(u32::from(ha.hb_lost_threshold));
    if fgcp_ms >= fgsp_ms {
        ctx.warn(
            pos,
            keys::HA.name,
            "hb-lost-threshold",
            format!(
                "the FGCP failover takes {fgcp_ms} ms (hb-interval x hb-lost-threshold), the \
                 FGSP peers declare this cluster lost after {fgsp_ms} ms (config cluster-peer): \
                 when a member fails, the other clusters claim its tunnels before the partner \
                 has taken over; keep the FGCP time well below, e.g. hb-interval 2 with \
                 hb-lost-threshold 3"
            ),
        );
    }
}

/// Manual-key checks: a tunnel name is one interface, whichever table
/// defines it; an inbound SPI identifies one SA.
fn validate_manualkey(ctx: &mut Ctx, st: &State) {
    for (name, pos) in &st.mk_names {
        if let Some(p1) = st.p1_names.get(name) {
            ctx.invalid(
                *pos,
                &format!("{}, edit \"{name}\"", keys::MANUALKEY.name),
                format!(
                    "\"{name}\" is also a config vpn ipsec phase1-interface entry (line {}): \
                     both would create an interface of that name",
                    p1.line
                ),
            );
        }
    }
    let mut spis: BTreeMap<u32, (&str, Pos)> = BTreeMap::new();
    for (m, pos) in st.config.manualkey.iter().zip(&st.mk) {
        let at = pos.local_spi.unwrap_or(pos.edit);
        if let Some((other, first)) = spis.get(&m.local_spi) {
            ctx.invalid(
                at,
                &format!("{}, edit \"{}\"", keys::MANUALKEY.name, m.name),
                format!(
                    "local-spi {:#x} is already used by \"{other}\" (line {}): inbound \
                     packets are matched to their tunnel by SPI",
                    m.local_spi, first.line
                ),
            );
        } else {
            spis.insert(m.local_spi, (m.name.as_str(), at));
        }
    }
}

/// Build the model from the parsed tree.
pub(crate) fn build(ctx: &mut Ctx, root: &Block) -> Config {
    let mut st = State::default();
    walk(ctx, &mut st, &root.items, "");
    validate(ctx, &st);
    validate_manualkey(ctx, &st);
    st.config
}

/// True when selector `s` covers address `ip`.
fn selector_contains(s: &Selector, ip: Ipv4Addr) -> bool {
    match s {
        Selector::Subnet(n) => n.contains(ip),
        Selector::Range { start, end } => (*start..=*end).contains(&ip),
        Selector::Ip(a) => *a == ip,
        Selector::Subnet6 { .. } => false,
    }
}

/// `tunnel-monitor enable|disable` and its `tunnel-monitor-*` keys (Haven, after PAN-OS's
/// tunnel monitor). Returns the positions of the source and destination values for the
/// cross-entry checks.
fn tunnel_monitor(
    ctx: &mut Ctx,
    f: &Fields<'_>,
    e: &Edit,
    p: &mut Phase1,
) -> (Option<Pos>, Option<Pos>) {
    const SUB: [&str; 5] = [
        "tunnel-monitor-destination-ip",
        "tunnel-monitor-source-ip",
        "tunnel-monitor-interval",
        "tunnel-monitor-threshold",
        "tunnel-monitor-action",
    ];
    let on = f.flag(ctx, "tunnel-monitor").unwrap_or(false);
    let destination = f.ipv4(ctx, "tunnel-monitor-destination-ip");
    let source = f.ipv4(ctx, "tunnel-monitor-source-ip");
    let interval_ms = seconds_ms(ctx, f, "tunnel-monitor-interval");
    let threshold = f.uint(ctx, "tunnel-monitor-threshold", 1, 100);
    let action = f.choice(
        ctx,
        "tunnel-monitor-action",
        &[
            ("wait-recover", MonitorAction::WaitRecover),
            ("fail-over", MonitorAction::FailOver),
        ],
        "",
    );
    let positions = (
        f.value_pos("tunnel-monitor-source-ip"),
        f.value_pos("tunnel-monitor-destination-ip"),
    );
    if !on {
        for key in SUB {
            if let Some(at) = f.key_pos(key) {
                ctx.warn(
                    at,
                    &f.block,
                    key,
                    "ignored without set tunnel-monitor enable",
                );
            }
        }
        return positions;
    }
    let at = f.value_pos("tunnel-monitor").unwrap_or(e.pos);
    if p.kind == Phase1Type::Dynamic {
        ctx.invalid(
            at,
            &f.block,
            "tunnel-monitor is for type static or ddns (a dial-up phase1 has no fixed peer)",
        );
        return positions;
    }
    let (Some(destination), Some(source)) = (destination, source) else {
        if !f.has("tunnel-monitor-destination-ip") {
            ctx.invalid(
                at,
                &f.block,
                "tunnel-monitor enable needs set tunnel-monitor-destination-ip <address behind the peer>",
            );
        }
        if !f.has("tunnel-monitor-source-ip") {
            ctx.invalid(
                at,
                &f.block,
                "tunnel-monitor enable needs set tunnel-monitor-source-ip <address of this gateway inside the local selector>",
            );
        }
        return positions;
    };
    if destination.is_unspecified() || destination.is_broadcast() || destination.is_multicast() {
        if let Some(pos) = positions.1 {
            ctx.invalid(
                pos,
                &f.block,
                "tunnel-monitor-destination-ip must be a unicast address",
            );
        }
    }
    if source.is_unspecified() || source.is_broadcast() || source.is_multicast() {
        if let Some(pos) = positions.0 {
            ctx.invalid(
                pos,
                &f.block,
                "tunnel-monitor-source-ip must be a unicast address",
            );
        }
    }
    p.tunnel_monitor = Some(TunnelMonitor {
        destination,
        source,
        interval_ms: interval_ms.unwrap_or(3_000),
        threshold: threshold.unwrap_or(5),
        action,
    });
    positions
}

/// `set KEY SECONDS [MILLISECONDS]` (Haven's DPD waits, like `dpd-retryinterval`): at
/// least 100 ms, at most 3600 s. `None` when unset or invalid (the error is reported).
fn seconds_ms(ctx: &mut Ctx, f: &Fields<'_>, key: &str) -> Option<u32> {
    let values = f.values(key)?;
    let (ms, at) = match values {
        [s] => match parse_uint(&s.text).filter(|v| (1..=3600).contains(v)) {
            Some(v) => (v * 1000, s),
            None => {
                ctx.bad(s, &f.block, key, "seconds 1..=3600");
                return None;
            }
        },
        [s, m] => {
            let secs = parse_uint(&s.text).filter(|v| *v <= 3600);
            let millis = parse_uint(&m.text).filter(|v| *v <= 999);
            match (secs, millis) {
                (None, _) => {
                    ctx.bad(s, &f.block, key, "seconds 0..=3600");
                    return None;
                }
                (_, None) => {
                    ctx.bad(m, &f.block, key, "milliseconds 0..=999");
                    return None;
                }
                (Some(a), Some(b)) => (a * 1000 + b, m),
            }
        }
        [_, _, extra, ..] => {
            ctx.bad(extra, &f.block, key, "SECONDS or SECONDS MILLISECONDS");
            return None;
        }
        [] => return None,
    };
    if ms < 100 {
        ctx.bad(at, &f.block, key, "a wait of at least 100 ms");
        return None;
    }
    u32::try_from(ms).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposals() {
        let ok1 = [
            "aes128-sha1",
            "aes256-sha512",
            "aes256gcm-prfsha384",
            "chacha20poly1305-prfsha256",
            "3des-md5",
        ];
        for s in ok1 {
            let p = parse_proposal(s, true).unwrap_or_else(|| panic!("{s}"));
            assert_eq!(p.to_string(), s);
        }
        let ok2 = [
            "aes128-sha1",
            "aes128gcm",
            "chacha20poly1305",
            "null-sha256",
            "aes256-null",
        ];
        for s in ok2 {
            let p = parse_proposal(s, false).unwrap_or_else(|| panic!("{s}"));
            assert_eq!(p.to_string(), s);
        }
        for bad in [
            "aes128",
            "aes128gcm",
            "null-sha1",
            "aes128-sha3",
            "aes128-null",
            "banana",
            "",
            "-",
        ] {
            assert!(parse_proposal(bad, true).is_none(), "{bad}");
        }
        for bad in [
            "aes128gcm-prfsha256",
            "null-null",
            "aes128",
            "aes128-prfsha1",
        ] {
            assert!(parse_proposal(bad, false).is_none(), "{bad}");
        }
    }
}
