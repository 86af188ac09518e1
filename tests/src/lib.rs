//! Haven's multi-process and interop test support: network namespaces with guaranteed cleanup,
//! strongSwan as a reference peer, and launching Haven's own daemons. The suites live in `tests/tests/`.
//! This crate holds no product code.

pub mod daemons;
pub mod gateway;
pub mod member;
pub mod netns;
pub mod strongswan;
