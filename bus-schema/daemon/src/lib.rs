//! Haven daemon shell: CLI, run-dir, metrics, control socket, logging and debug attach.
