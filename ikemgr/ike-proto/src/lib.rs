//! Sans-IO IKEv2 protocol core (RFC 7296).
