//! Haven bus: message types, topics, envelope, codec, ZeroMQ helpers and state recovery.
