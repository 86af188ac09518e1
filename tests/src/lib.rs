//! Haven multi-process and interop test suites.
