//! Haven's multi-process and interop test support: network namespaces with guaranteed cleanup,
//! strongSwan as a reference peer, and launching Haven's own daemons. The suites live in `tests/tests/`.
//! `gateway` is the one-gateway harness of the strongSwan suites, `member` the cluster-member
//! harness of the HA suites. This crate holds no product code.

pub mod daemons;
pub mod gateway;
pub mod member;
pub mod netns;
pub mod strongswan;
