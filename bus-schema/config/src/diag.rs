//! Diagnostics: [`ConfigError`], [`Warning`] and their collections.
//!
//! Both print in the `FILE:LINE:COL: error: …` style when they know the file
//! name, and as `line L, column C: error: …` when they do not (a string given
//! to [`crate::parse`]). Lines and columns count from 1; columns count
//! characters, not bytes.

use std::fmt;

use serde::Serialize;

/// What went wrong. One enum for the whole configuration layer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The text does not follow the `config/edit/set/unset/next/end`
    /// grammar (unterminated string, `next` without `edit`, …).
    #[error("{message}")]
    Syntax {
        /// What was found and what was expected.
        message: String,
    },
    /// A `set`/`unset` key that is neither implemented nor a known FortiOS
    /// key of this block.
    #[error("unknown key \"{key}\" in {block}; {expected}")]
    UnknownKey {
        /// The key as written.
        key: String,
        /// The block it appeared in, e.g. `config system ha`.
        block: String,
        /// `expected one of …`, possibly with a `did you mean` hint.
        expected: String,
    },
    /// A `config` block that is not a FortiOS block we know of.
    #[error("unknown block \"config {path}\"; {expected}")]
    UnknownBlock {
        /// The block path, e.g. `vpn ipsec phase1-interfac`.
        path: String,
        /// What was expected.
        expected: String,
    },
    /// A value that does not parse or is out of range.
    #[error("bad value \"{value}\" for {key}: expected {expected}")]
    BadValue {
        /// The key the value belongs to.
        key: String,
        /// The value as written.
        value: String,
        /// What was expected, e.g. `an integer 1..=3600`.
        expected: String,
    },
    /// A well-formed configuration that is inconsistent (a phase2 naming a
    /// missing phase1, a duplicate edit, a static gateway without
    /// remote-gw, …).
    #[error("{message}")]
    Invalid {
        /// What is inconsistent.
        message: String,
    },
    /// Nesting deeper than the parser accepts.
    #[error("blocks nested deeper than {limit} levels")]
    TooDeep {
        /// The limit.
        limit: usize,
    },
    /// The file could not be read.
    #[error("cannot read the configuration: {reason}")]
    Io {
        /// The operating system's or decoder's reason.
        reason: String,
    },
}

/// One error with its location.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
pub struct ConfigError {
    /// The file name, when known.
    pub file: Option<String>,
    /// 1-based line; 0 when the error concerns the whole file.
    pub line: u32,
    /// 1-based column in characters; 0 when the error concerns the whole file.
    pub col: u32,
    /// The enclosing block, e.g. `config vpn ipsec phase1-interface, edit "vpn1"`
    /// (empty at top level).
    pub block: String,
    /// What went wrong.
    #[source]
    pub kind: ErrorKind,
}

/// A FortiOS key or block Haven knows but does not implement (ignored), or
/// a setting that is accepted but suspicious.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Warning {
    /// The file name, when known.
    pub file: Option<String>,
    /// 1-based line.
    pub line: u32,
    /// 1-based column in characters.
    pub col: u32,
    /// The enclosing block path, e.g. `config system ha`.
    pub block: String,
    /// The key concerned (empty for whole-block warnings).
    pub key: String,
    /// What Haven does about it.
    pub message: String,
}

fn write_location(
    f: &mut fmt::Formatter<'_>,
    file: Option<&str>,
    line: u32,
    col: u32,
) -> fmt::Result {
    match (file, line) {
        (Some(file), 0) => write!(f, "{file}: "),
        (Some(file), _) => write!(f, "{file}:{line}:{col}: "),
        (None, 0) => Ok(()),
        (None, _) => write!(f, "line {line}, column {col}: "),
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_location(f, self.file.as_deref(), self.line, self.col)?;
        f.write_str("error: ")?;
        let names_block = matches!(
            self.kind,
            ErrorKind::UnknownKey { .. } | ErrorKind::Syntax { .. } | ErrorKind::Io { .. }
        );
        if !self.block.is_empty() && !names_block {
            write!(f, "{}: ", self.block)?;
        }
        write!(f, "{}", self.kind)
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_location(f, self.file.as_deref(), self.line, self.col)?;
        f.write_str("warning: ")?;
        if !self.key.is_empty() {
            write!(f, "{} in {}: ", self.key, self.block)?;
        } else if !self.block.is_empty() {
            write!(f, "{}: ", self.block)?;
        }
        f.write_str(&self.message)
    }
}

/// Every error found in one configuration, plus the warnings found before
/// parsing gave up. `Display` prints one diagnostic per line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConfigErrors {
    /// The errors, in file order.
    pub errors: Vec<ConfigError>,
    /// Warnings collected along the way.
    pub warnings: Vec<Warning>,
}

impl ConfigErrors {
    /// Stamp a file name on every diagnostic.
    pub fn set_file(&mut self, file: &str) {
        for e in &mut self.errors {
            e.file = Some(file.to_string());
        }
        for w in &mut self.warnings {
            w.file = Some(file.to_string());
        }
    }

    /// The first error (there is always at least one when this value comes
    /// from [`crate::parse`] or [`crate::load`]).
    pub fn first(&self) -> Option<&ConfigError> {
        self.errors.first()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for e in &self.errors {
            if !first {
                writeln!(f)?;
            }
            first = false;
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_with_and_without_file() {
        let mut e = ConfigError {
            file: None,
            line: 12,
            col: 9,
            block: "config vpn ipsec phase1-interface".into(),
            kind: ErrorKind::UnknownKey {
                key: "foo".into(),
                block: "config vpn ipsec phase1-interface".into(),
                expected: "expected one of type, interface".into(),
            },
        };
        assert_eq!(
            e.to_string(),
            "line 12, column 9: error: unknown key \"foo\" in config vpn ipsec \
             phase1-interface; expected one of type, interface"
        );
        e.file = Some("gw.conf".into());
        assert!(e
            .to_string()
            .starts_with("gw.conf:12:9: error: unknown key"));
        let w = Warning {
            file: Some("gw.conf".into()),
            line: 3,
            col: 5,
            block: "config system ha".into(),
            key: "upgrade-mode".into(),
            message: "not implemented by Haven; ignored".into(),
        };
        assert_eq!(
            w.to_string(),
            "gw.conf:3:5: warning: upgrade-mode in config system ha: not implemented by Haven; ignored"
        );
    }
}
