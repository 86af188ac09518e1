//! The outbound routes of one TUN device and their lookup: longest prefix over the remote
//! selectors of the device's SAs.
//!
//! A site-to-site tunnel puts a few routes on its device, and a linear scan over them is the
//! fastest lookup. A dial-up phase1 puts every client's routes on its one device: with 1 000
//! clients a linear scan would compare about 500 routes per packet. Above [`LINEAR_MAX`]
//! routes the set also keeps an index: for each address family and prefix length present,
//! the masked destination mapped to the routes for that exact prefix. A lookup then costs
//! one hash probe per prefix length present, whatever the number of routes, and picks the
//! same route as the scan.

use std::collections::HashMap;
use std::net::IpAddr;

use super::table::{mask, Cidr};

/// Up to this many routes a device is searched linearly.
pub const LINEAR_MAX: usize = 16;

/// What the lookup needs to know of a route.
pub trait RouteEntry {
    /// The remote selector the route is for.
    fn dst(&self) -> Cidr;
    /// Whether its SA may carry a packet from `src` now (outbound enabled, alive, within
    /// its volume limits, and `src` in its local selectors).
    fn usable(&self, src: IpAddr) -> bool;
    /// Whether its SA has received anything (the peer has installed it).
    fn received(&self) -> bool;
    /// Whether the two routes' SAs belong to one tunnel.
    fn same_tunnel(&self, other: &Self) -> bool;
}

/// The routes of one device, longest prefix first and, within a length, newest SA first.
pub struct RouteSet<R> {
    routes: Vec<R>,
    /// Empty up to [`LINEAR_MAX`] routes.
    index: Index,
}

/// For each family, the prefix lengths present, longest first, each with its map from the
/// masked destination to a run of `order` (positions in `routes`, in route order).
#[derive(Default)]
struct Index {
    v4: Vec<(u8, Runs)>,
    v6: Vec<(u8, Runs)>,
    order: Vec<u32>,
}

/// Masked destination -> (start, length) of its run in [`Index::order`].
type Runs = HashMap<u128, (u32, u32)>;

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
        let index = if routes.len() > LINEAR_MAX {
            Index::build(&routes)
        } else {
            Index::default()
        };
        RouteSet { routes, index }
    }

    /// The route a packet from `src` to `dst` takes: the first usable route (in order)
    /// whose prefix holds `dst`, except that a route whose SA has received nothing yields
    /// to a later one for the same prefix and tunnel whose SA has (make-before-break across
    /// a rekey: the peer may not have installed the new inbound SA yet; it proves it has by
    /// sending on it, or by deleting the old one).
    #[inline]
    pub fn lookup(&self, src: IpAddr, dst: IpAddr) -> Option<&R> {
        if self.index.order.is_empty() {
            self.lookup_linear(src, dst)
        } else {
            self.lookup_indexed(src, dst)
        }
    }

    /// The scan over every route; the reference the index must agree with.
    fn lookup_linear(&self, src: IpAddr, dst: IpAddr) -> Option<&R> {
        let mut it = self.routes.iter().filter(|r| r.dst().contains(dst));
        let first = it.find(|r| r.usable(src))?;
        Some(pick_received(first, it, src))
    }

    fn lookup_indexed(&self, src: IpAddr, dst: IpAddr) -> Option<&R> {
        let lens = if dst.is_ipv6() {
            &self.index.v6
        } else {
            &self.index.v4
        };
        for (len, at) in lens {
            let Some(&(start, n)) = at.get(&bits(mask(dst, *len)).0) else {
                continue;
            };
            // Every route of this run is for the same prefix, which holds `dst`; a longer
            // one that held it had no usable route.
            let run = self
                .index
                .order
                .get(start as usize..start as usize + n as usize)
                .unwrap_or_default();
            let mut it = run.iter().filter_map(|i| self.routes.get(*i as usize));
            if let Some(first) = it.find(|r| r.usable(src)) {
                return Some(pick_received(first, it, src));
            }
        }
        None
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

impl Index {
    fn build<R: RouteEntry>(routes: &[R]) -> Index {
        // (family, longest first, prefix, position): runs of one prefix keep route order.
        let mut keyed: Vec<(bool, std::cmp::Reverse<u8>, u128, u32)> = routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let d = r.dst();
                let (value, v6) = bits(d.addr());
                (v6, std::cmp::Reverse(d.len()), value, i as u32)
            })
            .collect();
        keyed.sort_unstable();
        let mut index = Index {
            order: keyed.iter().map(|k| k.3).collect(),
            ..Index::default()
        };
        let mut start = 0;
        while start < keyed.len() {
            let (v6, std::cmp::Reverse(len), value, _) = keyed[start];
            let n = keyed[start..]
                .iter()
                .take_while(|k| (k.0, k.1 .0, k.2) == (v6, len, value))
                .count();
            let lens = if v6 { &mut index.v6 } else { &mut index.v4 };
            if lens.last().is_none_or(|(l, _)| *l != len) {
                lens.push((len, HashMap::new()));
            }
            if let Some((_, at)) = lens.last_mut() {
                at.insert(value, (start as u32, n as u32));
            }
            start += n;
        }
        index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A route with its SA's state spelled out.
    #[derive(Debug)]
    struct Fake {
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

    fn random_set(r: &mut Rng, n: usize) -> RouteSet<Fake> {
        let mut routes: Vec<Fake> = (0..n)
            .map(|_| Fake {
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
            })
            .collect();
        // Table::build's order: longest first, the given order (newest first) within.
        routes.sort_by_key(|r| std::cmp::Reverse(r.dst.len()));
        RouteSet::new(routes)
    }

    fn position(set: &RouteSet<Fake>, got: Option<&Fake>) -> Option<usize> {
        got.map(|g| {
            set.routes
                .iter()
                .position(|r| std::ptr::eq(r, g))
                .expect("a route of the set")
        })
    }

    #[test]
    fn the_index_picks_the_route_the_scan_picks() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let mut hits = 0;
        for round in 0..300 {
            let n = LINEAR_MAX + 1 + r.below(200) as usize;
            let set = random_set(&mut r, n);
            assert!(!set.index.order.is_empty());
            for _ in 0..200 {
                let v6 = r.below(4) == 0;
                let dst = addr(&mut r, v6);
                let src = if r.below(6) == 0 {
                    "10.9.1.1".parse().unwrap()
                } else if v6 {
                    "fd00:9::1".parse().unwrap()
                } else {
                    "10.8.0.1".parse().unwrap()
                };
                let want = position(&set, set.lookup_linear(src, dst));
                let got = position(&set, set.lookup(src, dst));
                assert_eq!(got, want, "round {round}: {src} -> {dst}");
                hits += usize::from(want.is_some());
            }
        }
        assert!(hits > 10_000, "lookups mostly find a route ({hits})");
    }

    #[test]
    fn a_small_device_is_scanned_and_a_large_one_indexed() {
        let mut r = Rng(7);
        assert!(random_set(&mut r, LINEAR_MAX).index.order.is_empty());
        let big = random_set(&mut r, LINEAR_MAX + 1);
        assert_eq!(big.index.order.len(), LINEAR_MAX + 1);
        // The make-before-break rule through the index: the newer SA of a tunnel that has
        // received nothing yields to the older one that has; once it receives, it is used.
        let host = |s: &str| Cidr::parse(s).unwrap();
        let mut routes: Vec<Fake> = (0..40)
            .map(|i| Fake {
                dst: host(&format!("10.1.0.{i}/32")),
                local: host("0.0.0.0/0"),
                outbound: true,
                received: true,
                tunnel: 1,
            })
            .collect();
        routes.insert(
            7,
            Fake {
                dst: host("10.1.0.7/32"),
                local: host("0.0.0.0/0"),
                outbound: true,
                received: false,
                tunnel: 1,
            },
        );
        routes.push(Fake {
            dst: host("10.0.0.0/8"),
            local: host("0.0.0.0/0"),
            outbound: true,
            received: true,
            tunnel: 2,
        });
        let mut set = RouteSet::new(routes);
        let src: IpAddr = "10.8.0.1".parse().unwrap();
        let to = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(position(&set, set.lookup(src, to("10.1.0.7"))), Some(8));
        set.routes[7].received = true;
        assert_eq!(position(&set, set.lookup(src, to("10.1.0.7"))), Some(7));
        // No host route: the /8; outside it: nothing; another family: nothing.
        assert_eq!(position(&set, set.lookup(src, to("10.2.0.1"))), Some(41));
        assert_eq!(set.lookup(src, to("192.0.2.1")).map(|r| r.tunnel), None);
        assert_eq!(set.lookup(src, to("fd00::1")).map(|r| r.tunnel), None);
        // A host route whose SAs may not send falls through to the shorter prefix.
        set.routes[7].outbound = false;
        set.routes[8].outbound = false;
        assert_eq!(position(&set, set.lookup(src, to("10.1.0.7"))), Some(41));
    }

    /// `cargo test --release -p espd routes_bench -- --ignored --nocapture`: ns per lookup
    /// on one device with N host routes (a dial-up phase1 with N clients), the index beside
    /// the linear scan over the same routes in the same run. Asserts nothing about time.
    #[test]
    #[ignore]
    fn routes_bench() {
        for n in [4usize, 16, 100, 1_000, 10_000, 100_000] {
            let routes: Vec<Fake> = (0..n)
                .map(|i| Fake {
                    dst: Cidr::parse(&format!("10.{}.{}.{}/32", i >> 16, (i >> 8) & 255, i & 255))
                        .unwrap(),
                    local: Cidr::parse("0.0.0.0/0").unwrap(),
                    outbound: true,
                    received: true,
                    tunnel: 0,
                })
                .collect();
            let t = std::time::Instant::now();
            let set = RouteSet::new(routes);
            let build = t.elapsed();
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
            let linear = time(&|d| set.lookup_linear(src, d).map(|r| r.tunnel as usize + 1));
            println!(
                "{n:>7} host routes on one device: lookup {lookup:>9.1} ns ({}); reference, linear scan {linear:>11.1} ns; set built in {build:?}",
                if set.index.order.is_empty() { "scan" } else { "index" }
            );
        }
    }
}
