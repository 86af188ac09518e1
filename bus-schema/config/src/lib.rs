//! Haven configuration: the FortiOS CLI dialect parsed into a typed model.
