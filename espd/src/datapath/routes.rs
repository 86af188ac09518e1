//! The outbound routes of one TUN device and their lookup: longest prefix over the remote
//! selectors of the device's SAs.
//!
//! A site-to-site tunnel puts a few routes on its device, and a linear scan over them is the
//! fastest lookup. A dial-up phase1 puts every client's routes on its one device: with 1 000
//! clients a linear scan would compare about 500 routes per packet. Above [`LINEAR_MAX`]
//! routes the set also keeps an index: for each address family and prefix length present,
//! the masked destination mapped to the routes for that exact prefix. A lookup then costs
//! one hash probe per prefix length present, whatever the number of routes, and picks the
//! same route as the scan. The runs sit in shared shards ([`Sharded`]): a client coming or
//! going makes the device's next version from the previous one ([`RouteSet::changed`]),
//! copying the shards it touches, instead of sorting and indexing every route again.

use std::net::IpAddr;
use std::sync::Arc;

use super::shards::{ShardKey, Sharded};
use super::table::{mask, Cidr};

/// Up to this many routes a device is searched linearly.
pub const LINEAR_MAX: usize = 16;

/// What the lookup needs to know of a route.
pub trait RouteEntry: Clone {
    /// The remote selector the route is for.
    fn dst(&self) -> Cidr;
    /// Whether its SA may carry a packet from `src` now (outbound enabled, alive, within
    /// its volume limits, and `src` in its local selectors).
    fn usable(&self, src: IpAddr) -> bool;
    /// Whether its SA has received anything (the peer has installed it).
    fn received(&self) -> bool;
    /// Whether the two routes' SAs belong to one tunnel.
    fn same_tunnel(&self, other: &Self) -> bool;
    /// Whether this route comes after `other` among the routes for one prefix: the newest
    /// SA first, then the table's order (SA keys) among SAs installed at the same instant.
    fn after(&self, other: &Self) -> bool;
    /// Whether the two are one route (the same SA's, for the same prefix).
    fn same(&self, other: &Self) -> bool;
}

/// The routes of one device, longest prefix first and, within a length, newest SA first.
#[derive(Clone)]
pub struct RouteSet<R> {
    /// Up to [`LINEAR_MAX`] routes, in lookup order; empty when indexed.
    routes: Vec<R>,
    /// More than [`LINEAR_MAX`] routes.
    index: Option<Index<R>>,
    len: usize,
}

impl<R> Default for RouteSet<R> {
    fn default() -> Self {
        RouteSet {
            routes: Vec::new(),
            index: None,
            len: 0,
        }
    }
}

/// The routes for one exact prefix, in lookup order.
type Run<R> = Arc<Vec<R>>;

/// For each family, the prefix lengths present, longest first, each with its runs by masked
/// destination. The runs sit in shared shards: a new version of a device copies the shards
/// its changes touch, not the routes.
#[derive(Clone)]
struct Index<R> {
    v4: Vec<(u8, Sharded<u128, Run<R>>)>,
    v6: Vec<(u8, Sharded<u128, Run<R>>)>,
}

impl ShardKey for u128 {
    #[inline]
    fn shard(&self) -> usize {
        let folded = (*self as u64) ^ ((*self >> 64) as u64);
        (folded.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as usize & (super::shards::SHARDS - 1)
    }
}

/// The address as a number and whether it is IPv6.
fn bits(ip: IpAddr) -> (u128, bool) {
    match ip {
        IpAddr::V4(a) => (u128::from(u32::from(a)), false),
        IpAddr::V6(a) => (u128::from(a), true),
    }
}

impl<R: RouteEntry> RouteSet<R> {
    /// `routes` must already be in lookup order: longest prefix first, newest SA first
    /// within a length.
    pub fn new(routes: Vec<R>) -> Self {
        let len = routes.len();
        if len <= LINEAR_MAX {
            return RouteSet {
                routes,
                index: None,
                len,
            };
        }
        let mut index = Index {
            v4: Vec::new(),
            v6: Vec::new(),
        };
        for r in routes {
            index.add(r);
        }
        RouteSet {
            routes: Vec::new(),
            index: Some(index),
            len,
        }
    }

    /// The set scanned whatever its size (the reference the index must agree with).
    #[cfg(test)]
    fn linear(routes: Vec<R>) -> Self {
        let len = routes.len();
        RouteSet {
            routes,
            index: None,
            len,
        }
    }

    /// This set without the routes `removed` and with `added`, made from its shared shards
    /// (at 100 000 routes, a change copies the shard of each route it touches instead of
    /// sorting and indexing every route again). None when this set is scanned, or would be
    /// small enough to be scanned: the caller builds it whole then.
    pub fn changed(&self, removed: &[R], added: &[R]) -> Option<RouteSet<R>> {
        let index = self.index.as_ref()?;
        let mut index = index.clone();
        let mut len = self.len;
        for r in removed {
            if index.remove(r) {
                len -= 1;
            }
        }
        if len + added.len() <= LINEAR_MAX {
            return None;
        }
        for r in added {
            index.add(r.clone());
            len += 1;
        }
        Some(RouteSet {
            routes: Vec::new(),
            index: Some(index),
            len,
        })
    }

    /// The routes by prefix, each with its routes in lookup order: prefixes in lookup order
    /// (family, longest first, then by value). Two sets with the same runs look up alike.
    #[cfg(any(test, debug_assertions))]
    pub fn runs(&self) -> Vec<(Cidr, Vec<&R>)> {
        let mut out: Vec<(Cidr, Vec<&R>)> = Vec::new();
        match &self.index {
            None => {
                for r in &self.routes {
                    match out.iter_mut().find(|(d, _)| *d == r.dst()) {
                        Some((_, run)) => run.push(r),
                        None => out.push((r.dst(), vec![r])),
                    }
                }
            }
            Some(index) => {
                for (_, runs) in index.v4.iter().chain(&index.v6) {
                    for (_, run) in runs.iter() {
                        if let Some(first) = run.first() {
                            out.push((first.dst(), run.iter().collect()));
                        }
                    }
                }
            }
        }
        out.sort_by_key(|(d, _)| {
            let (value, v6) = bits(d.addr());
            (v6, std::cmp::Reverse(d.len()), value)
        });
        out
    }

    /// The route a packet from `src` to `dst` takes: the first usable route (in order)
    /// whose prefix holds `dst`, except that a route whose SA has received nothing yields
    /// to a later one for the same prefix and tunnel whose SA has (make-before-break across
    /// a rekey: the peer may not have installed the new inbound SA yet; it proves it has by
    /// sending on it, or by deleting the old one).
    #[inline]
    pub fn lookup(&self, src: IpAddr, dst: IpAddr) -> Option<&R> {
        match &self.index {
            None => self.lookup_linear(src, dst),
            Some(index) => index.lookup(src, dst),
        }
    }

    /// The scan over every route.
    fn lookup_linear(&self, src: IpAddr, dst: IpAddr) -> Option<&R> {
        let mut it = self.routes.iter().filter(|r| r.dst().contains(dst));
        let first = it.find(|r| r.usable(src))?;
        Some(pick_received(first, it, src))
    }
}

impl<R: RouteEntry> Index<R> {
    fn lookup(&self, src: IpAddr, dst: IpAddr) -> Option<&R> {
        let lens = if dst.is_ipv6() { &self.v6 } else { &self.v4 };
        for (len, runs) in lens {
            // Every route of this run is for the same prefix, which holds `dst`; a longer
            // one that held it had no usable route.
            let Some(run) = runs.get(&bits(mask(dst, *len)).0) else {
                continue;
            };
            let mut it = run.iter();
            if let Some(first) = it.find(|r| r.usable(src)) {
                return Some(pick_received(first, it, src));
            }
        }
        None
    }

    /// Puts `r` into the run of its prefix, before the first route that comes after it.
    fn add(&mut self, r: R) {
        let d = r.dst();
        let (value, v6) = bits(d.addr());
        let lens = if v6 { &mut self.v6 } else { &mut self.v4 };
        // Longest first.
        let at = match lens.iter().position(|(l, _)| *l <= d.len()) {
            Some(i) if lens[i].0 == d.len() => i,
            Some(i) => {
                lens.insert(i, (d.len(), Sharded::default()));
                i
            }
            None => {
                lens.push((d.len(), Sharded::default()));
                lens.len() - 1
            }
        };
        let runs = &mut lens[at].1;
        match runs.get_mut(&value) {
            Some(run) => {
                let run = Arc::make_mut(run);
                match run.iter().position(|x| x.after(&r)) {
                    Some(i) => run.insert(i, r),
                    None => run.push(r),
                }
            }
            None => {
                runs.insert(value, Arc::new(vec![r]));
            }
        }
    }

    /// Takes `r` out of its run (and the run, and the length, when they empty). False when
    /// it was not there.
    fn remove(&mut self, r: &R) -> bool {
        let d = r.dst();
        let (value, v6) = bits(d.addr());
        let lens = if v6 { &mut self.v6 } else { &mut self.v4 };
        let Some(at) = lens.iter().position(|(l, _)| *l == d.len()) else {
            return false;
        };
        let runs = &mut lens[at].1;
        let Some(run) = runs.get_mut(&value) else {
            return false;
        };
        let Some(i) = run.iter().position(|x| x.same(r)) else {
            return false;
        };
        if run.len() == 1 {
            runs.remove(&value);
            if runs.is_empty() {
                lens.remove(at);
            }
        } else {
            Arc::make_mut(run).remove(i);
        }
        true
    }
}

/// `first`, or if its SA has received nothing, the first of `later` (routes after it that
/// hold the same destination) for the same prefix and tunnel that is usable and has.
fn pick_received<'a, R: RouteEntry>(
    first: &'a R,
    later: impl Iterator<Item = &'a R>,
    src: IpAddr,
) -> &'a R {
    if first.received() {
        return first;
    }
    let prefix = first.dst();
    later
        .filter(|r| r.dst() == prefix && r.same_tunnel(first))
        .find(|r| r.usable(src) && r.received())
        .unwrap_or(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A route with its SA's state spelled out; `age` and `id` order it as the table does
    /// (the newest SA first, then by key).
    #[derive(Clone, Debug)]
    struct Fake {
        id: usize,
        age: u32,
        dst: Cidr,
        local: Cidr,
        outbound: bool,
        received: bool,
        tunnel: u8,
    }

    impl RouteEntry for Fake {
        fn dst(&self) -> Cidr {
            self.dst
        }
        fn usable(&self, src: IpAddr) -> bool {
            self.outbound && self.local.contains(src)
        }
        fn received(&self) -> bool {
            self.received
        }
        fn same_tunnel(&self, other: &Self) -> bool {
            self.tunnel == other.tunnel
        }
        fn after(&self, other: &Self) -> bool {
            (other.age, self.id) > (self.age, other.id)
        }
        fn same(&self, other: &Self) -> bool {
            self.id == other.id
        }
    }

    use bus_schema::test_rng::Rng;

    /// An address from a small space (so prefixes overlap and lookups hit), either family.
    fn addr(r: &mut Rng, v6: bool) -> IpAddr {
        let (a, b) = (r.below(3), r.below(6));
        if v6 {
            format!("fd00:{a}::{b}").parse().unwrap()
        } else {
            format!("10.{a}.0.{b}").parse().unwrap()
        }
    }

    fn prefix(r: &mut Rng) -> Cidr {
        let v6 = r.below(4) == 0;
        let lens: &[u8] = if v6 {
            &[0, 16, 32, 120, 126, 127, 128]
        } else {
            &[0, 8, 16, 29, 30, 31, 32]
        };
        let len = lens[r.below(lens.len() as u64) as usize];
        let a = addr(r, v6);
        Cidr::parse(&format!("{a}/{len}")).unwrap()
    }

    fn random_route(r: &mut Rng, id: usize) -> Fake {
        Fake {
            id,
            age: r.below(50) as u32,
            dst: prefix(r),
            local: if r.below(5) == 0 {
                Cidr::parse("10.9.0.0/16").unwrap()
            } else if r.below(2) == 0 {
                Cidr::parse("0.0.0.0/0").unwrap()
            } else {
                Cidr::parse("::/0").unwrap()
            },
            outbound: r.below(4) != 0,
            received: r.below(3) != 0,
            tunnel: r.below(4) as u8,
        }
    }

    /// Table::build's order: longest first, then the newest first, then by key.
    fn sorted(mut routes: Vec<Fake>) -> Vec<Fake> {
        routes.sort_by_key(|r| {
            (
                std::cmp::Reverse(r.dst.len()),
                std::cmp::Reverse(r.age),
                r.id,
            )
        });
        routes
    }

    fn random_routes(r: &mut Rng, n: usize) -> Vec<Fake> {
        sorted((0..n).map(|i| random_route(r, i)).collect())
    }

    fn random_src(r: &mut Rng, v6: bool) -> IpAddr {
        if r.below(6) == 0 {
            "10.9.1.1".parse().unwrap()
        } else if v6 {
            "fd00:9::1".parse().unwrap()
        } else {
            "10.8.0.1".parse().unwrap()
        }
    }

    fn id(got: Option<&Fake>) -> Option<usize> {
        got.map(|g| g.id)
    }

    type Runs = Vec<(Cidr, Vec<usize>)>;

    fn ids(set: &RouteSet<Fake>) -> Runs {
        set.runs()
            .into_iter()
            .map(|(d, run)| (d, run.iter().map(|r| r.id).collect()))
            .collect()
    }

    #[test]
    fn the_index_picks_the_route_the_scan_picks() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let mut hits = 0;
        for round in 0..300 {
            let n = LINEAR_MAX + 1 + r.below(200) as usize;
            let routes = random_routes(&mut r, n);
            let set = RouteSet::new(routes.clone());
            let scan = RouteSet::linear(routes);
            assert!(set.index.is_some());
            assert_eq!(ids(&set), ids(&scan));
            for _ in 0..200 {
                let v6 = r.below(4) == 0;
                let dst = addr(&mut r, v6);
                let src = random_src(&mut r, v6);
                let want = id(scan.lookup(src, dst));
                assert_eq!(
                    id(set.lookup(src, dst)),
                    want,
                    "round {round}: {src} -> {dst}"
                );
                hits += usize::from(want.is_some());
            }
        }
        assert!(hits > 10_000, "lookups mostly find a route ({hits})");
    }

    /// Routes taken out and put in by [`RouteSet::changed`], over many versions, give the
    /// runs and the lookups of the set built whole from the routes then present; earlier
    /// versions keep theirs.
    #[test]
    fn a_changed_set_is_the_set_built_whole() {
        let mut r = Rng(0x2545_f491_4f6c_dd1d);
        let mut next_id = 1_000_000;
        for round in 0..60 {
            let n = LINEAR_MAX + 1 + r.below(120) as usize;
            let mut present = random_routes(&mut r, n);
            let mut set = RouteSet::new(present.clone());
            let mut kept: Vec<(RouteSet<Fake>, Runs)> = Vec::new();
            for step in 0..40 {
                let mut gone = Vec::new();
                for _ in 0..r.below(4) {
                    if !present.is_empty() {
                        let i = r.below(present.len() as u64) as usize;
                        gone.push(present.remove(i));
                    }
                }
                // A route not in the set is ignored.
                if r.below(5) == 0 {
                    gone.push(random_route(&mut r, 999_999));
                }
                let new: Vec<Fake> = (0..r.below(4))
                    .map(|_| {
                        next_id += 1;
                        random_route(&mut r, next_id)
                    })
                    .collect();
                present.extend(new.iter().cloned());
                present = sorted(present);
                let whole = RouteSet::new(present.clone());
                match set.changed(&gone, &new) {
                    Some(changed) => {
                        assert_eq!(ids(&changed), ids(&whole), "round {round} step {step}");
                        for _ in 0..50 {
                            let v6 = r.below(4) == 0;
                            let dst = addr(&mut r, v6);
                            let src = random_src(&mut r, v6);
                            assert_eq!(id(changed.lookup(src, dst)), id(whole.lookup(src, dst)));
                        }
                        kept.push((set, ids(&changed)));
                        set = changed;
                    }
                    None => {
                        // Scanned before or after: built whole.
                        assert!(
                            present.len() <= LINEAR_MAX || set.index.is_none(),
                            "round {round} step {step}"
                        );
                        set = whole;
                        kept.clear();
                    }
                }
                if kept.len() > 3 {
                    let (old, _) = kept.remove(0);
                    drop(old);
                }
            }
            // Each kept version still has what it had (shards copied, not shared changes).
            for w in kept.windows(2) {
                assert_eq!(ids(&w[1].0), w[0].1);
            }
        }
    }

    #[test]
    fn a_small_device_is_scanned_and_a_large_one_indexed() {
        let mut r = Rng(7);
        let small = RouteSet::new(random_routes(&mut r, LINEAR_MAX));
        assert!(small.index.is_none());
        assert!(
            small.changed(&[], &[]).is_none(),
            "a scanned set is built whole"
        );
        assert!(RouteSet::new(random_routes(&mut r, LINEAR_MAX + 1))
            .index
            .is_some());
        // The make-before-break rule through the index: the newer SA of a tunnel that has
        // received nothing yields to the older one that has; once it receives, it is used.
        let host = |s: &str| Cidr::parse(s).unwrap();
        let route = |id: usize, age: u32, dst: &str, received: bool, tunnel: u8| Fake {
            id,
            age,
            dst: host(dst),
            local: host("0.0.0.0/0"),
            outbound: true,
            received,
            tunnel,
        };
        let mut routes: Vec<Fake> = (0..40)
            .map(|i| route(i, 1, &format!("10.1.0.{i}/32"), true, 1))
            .collect();
        routes.push(route(100, 2, "10.1.0.7/32", false, 1));
        routes.push(route(200, 1, "10.0.0.0/8", true, 2));
        let src: IpAddr = "10.8.0.1".parse().unwrap();
        let to = |s: &str| s.parse::<IpAddr>().unwrap();
        let set = RouteSet::new(sorted(routes.clone()));
        assert!(set.index.is_some());
        assert_eq!(id(set.lookup(src, to("10.1.0.7"))), Some(7));
        // No host route: the /8; outside it: nothing; another family: nothing.
        assert_eq!(id(set.lookup(src, to("10.2.0.1"))), Some(200));
        assert_eq!(set.lookup(src, to("192.0.2.1")).map(|r| r.tunnel), None);
        assert_eq!(set.lookup(src, to("fd00::1")).map(|r| r.tunnel), None);
        routes[40].received = true;
        let set = RouteSet::new(sorted(routes.clone()));
        assert_eq!(id(set.lookup(src, to("10.1.0.7"))), Some(100));
        // A host route whose SAs may not send falls through to the shorter prefix.
        routes[40].outbound = false;
        routes[7].outbound = false;
        let set = RouteSet::new(sorted(routes));
        assert_eq!(id(set.lookup(src, to("10.1.0.7"))), Some(200));
    }

    /// `cargo test --release -p espd routes_bench -- --ignored --nocapture`: ns per lookup
    /// on one device with N host routes (a dial-up phase1 with N clients), the index beside
    /// the linear scan over the same routes in the same run; and one client coming, the
    /// set made from the previous one beside the set built whole. Asserts nothing about
    /// time.
    #[test]
    #[ignore]
    fn routes_bench() {
        for n in [4usize, 16, 100, 1_000, 10_000, 100_000] {
            let host = |i: usize| {
                Cidr::parse(&format!("10.{}.{}.{}/32", i >> 16, (i >> 8) & 255, i & 255)).unwrap()
            };
            let route = |i: usize| Fake {
                id: i,
                age: 0,
                dst: host(i),
                local: Cidr::parse("0.0.0.0/0").unwrap(),
                outbound: true,
                received: true,
                tunnel: 0,
            };
            let routes: Vec<Fake> = (0..n).map(route).collect();
            let t = std::time::Instant::now();
            let set = RouteSet::new(routes.clone());
            let build = t.elapsed();
            let scan = RouteSet::linear(routes.clone());
            let src: IpAddr = "10.255.0.1".parse().unwrap();
            let dsts: Vec<IpAddr> = (0..4096u64)
                .map(|i| {
                    let i = (i.wrapping_mul(2_654_435_761) % n as u64) as usize;
                    format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255)
                        .parse()
                        .unwrap()
                })
                .collect();
            let time = |f: &dyn Fn(IpAddr) -> Option<usize>| {
                let rounds = (2_000_000 / n.max(1_000)).max(2);
                let t = std::time::Instant::now();
                let mut found = 0usize;
                for _ in 0..rounds {
                    for d in &dsts {
                        found += f(*d).unwrap_or(0);
                    }
                }
                std::hint::black_box(found);
                t.elapsed().as_nanos() as f64 / (rounds * dsts.len()) as f64
            };
            let lookup = time(&|d| set.lookup(src, d).map(|r| r.tunnel as usize + 1));
            let linear = time(&|d| scan.lookup(src, d).map(|r| r.tunnel as usize + 1));
            println!(
                "{n:>7} host routes on one device: lookup {lookup:>9.1} ns ({}); reference, linear scan {linear:>11.1} ns",
                if set.index.is_some() { "index" } else { "scan" }
            );
            // One client more: the next version from this one, beside the whole build.
            let mut more = routes;
            more.push(route(n));
            let t = std::time::Instant::now();
            let changed = set.changed(&[], &[route(n)]);
            let step = t.elapsed();
            let t = std::time::Instant::now();
            let whole = RouteSet::new(more);
            let rebuild = t.elapsed();
            std::hint::black_box((&changed, &whole));
            println!(
                "{n:>7} host routes: one route added {}; reference, the set built whole {rebuild:.2?} (this one in {build:.2?})",
                match changed {
                    Some(_) => format!("{step:.2?}"),
                    None => "(scanned: built whole)".into(),
                }
            );
        }
    }
}
