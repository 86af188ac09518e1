//! Traffic selector narrowing (RFC 7296 §2.9).

use crate::wire::TrafficSelector;

/// Intersection of two selectors of the same type, if not empty.
pub fn intersect(a: &TrafficSelector, b: &TrafficSelector) -> Option<TrafficSelector> {
    if a.ts_type != b.ts_type || a.start.len() != b.start.len() || a.end.len() != b.end.len() {
        return None;
    }
    let ip_proto = match (a.ip_proto, b.ip_proto) {
        (0, p) | (p, 0) => p,
        (x, y) if x == y => x,
        _ => return None,
    };
    let start_port = a.start_port.max(b.start_port);
    let end_port = a.end_port.min(b.end_port);
    if start_port > end_port {
        return None;
    }
    // Addresses of equal length compare as big-endian integers.
    let start = a.start.clone().max(b.start.clone());
    let end = a.end.clone().min(b.end.clone());
    if start > end {
        return None;
    }
    Some(TrafficSelector {
        ts_type: a.ts_type,
        ip_proto,
        start_port,
        end_port,
        start,
        end,
    })
}

/// Narrows the peer's proposal to what our policy allows: every non-empty
/// intersection of a proposed selector with a configured one.
pub fn narrow(proposed: &[TrafficSelector], policy: &[TrafficSelector]) -> Vec<TrafficSelector> {
    let mut out: Vec<TrafficSelector> = Vec::new();
    for p in proposed {
        for q in policy {
            if let Some(i) = intersect(p, q) {
                if !out.contains(&i) {
                    out.push(i);
                }
            }
        }
    }
    out
}

/// True when `inner` lies within `outer`.
pub fn is_subset(inner: &TrafficSelector, outer: &TrafficSelector) -> bool {
    intersect(inner, outer).as_ref() == Some(inner)
}

/// True when every selector of `got` lies within one of `allowed`.
pub fn all_within(got: &[TrafficSelector], allowed: &[TrafficSelector]) -> bool {
    !got.is_empty() && got.iter().all(|g| allowed.iter().any(|a| is_subset(g, a)))
}

#[cfg(test)]
#[allow(clippy::cloned_ref_to_slice_refs)]
mod tests {
    use super::*;

    fn net(s: &str, p: u8) -> TrafficSelector {
        TrafficSelector::subnet(s.parse().unwrap(), p)
    }

    #[test]
    fn narrowing_follows_section_2_9() {
        let any = net("0.0.0.0", 0);
        let lan = net("10.1.0.0", 16);
        // Peer asks for everything; policy allows 10.1/16: result is 10.1/16.
        assert_eq!(narrow(&[any.clone()], &[lan.clone()]), vec![lan.clone()]);
        // Peer asks for a subset: kept as is.
        let sub = net("10.1.2.0", 24);
        assert_eq!(narrow(&[sub.clone()], &[lan.clone()]), vec![sub.clone()]);
        // Disjoint: nothing.
        assert!(narrow(&[net("192.168.0.0", 16)], &[lan.clone()]).is_empty());
        // IPv6 never matches IPv4.
        assert!(narrow(&[net("::", 0)], &[lan.clone()]).is_empty());
        // Protocol and ports.
        let mut tcp = any.clone();
        tcp.ip_proto = 6;
        tcp.start_port = 443;
        tcp.end_port = 443;
        let n = narrow(&[tcp.clone()], &[lan.clone()]);
        assert_eq!(n[0].ip_proto, 6);
        assert_eq!((n[0].start_port, n[0].end_port), (443, 443));
        let mut udp = lan.clone();
        udp.ip_proto = 17;
        assert!(narrow(&[tcp], &[udp]).is_empty());
        assert!(all_within(&[sub.clone()], &[lan.clone()]));
        assert!(!all_within(&[any], &[lan]));
        assert!(!all_within(&[], &[sub]));
    }
}
