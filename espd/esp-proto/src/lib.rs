//! Sans-IO ESP transforms and anti-replay (RFC 4303).
