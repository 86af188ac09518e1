//! The [`Secret`] newtype: key material read from the configuration.

use std::fmt;

use serde::{Serialize, Serializer};

/// The text every view prints in place of a secret.
pub const REDACTED: &str = "<redacted>";

/// How a secret was written in the configuration file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecretForm {
    /// Written in clear (`set psksecret mykey`): usable.
    Clear,
    /// FortiOS's encrypted export form (`set psksecret ENC <base64>`). It is
    /// encrypted with a key private to FortiOS, so Haven cannot recover the
    /// clear text: not usable.
    FortiosEncrypted,
    /// A masked placeholder as printed in documentation (`********`): not
    /// usable.
    Masked,
}

/// Key material (pre-shared keys, cluster passwords).
///
/// `Debug`, `Display` and `Serialize` print `<redacted>`; the bytes are only
/// reachable through [`Secret::expose_bytes`]. The buffer is overwritten with
/// zeros when the value is dropped. Equality compares the bytes and is not
/// constant-time: it exists for configuration comparison, never for
/// authentication.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    bytes: Vec<u8>,
    form: SecretForm,
}

impl Secret {
    /// A secret written in clear.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self::with_form(bytes, SecretForm::Clear)
    }

    /// A secret with an explicit [`SecretForm`].
    pub fn with_form(bytes: impl Into<Vec<u8>>, form: SecretForm) -> Self {
        Secret {
            bytes: bytes.into(),
            form,
        }
    }

    /// The secret's bytes. For [`SecretForm::FortiosEncrypted`] this is the
    /// encrypted blob as written, for [`SecretForm::Masked`] the mask.
    pub fn expose_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// How the secret was written.
    pub fn form(&self) -> SecretForm {
        self.form
    }

    /// True when the bytes are the real key (written in clear).
    pub fn is_usable(&self) -> bool {
        self.form == SecretForm::Clear
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// True for an empty secret.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.bytes.fill(0);
        // Keep the wipe of memory about to be freed from being optimised
        // away (best effort, without unsafe code).
        std::hint::black_box(&self.bytes);
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({REDACTED})")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let s = Secret::new("hunter2hunter2");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert_eq!(format!("{s}"), "<redacted>");
        assert!(!format!("{s:?}{s}").contains("hunter2"));
        assert_eq!(s.expose_bytes(), b"hunter2hunter2");
        assert!(s.is_usable());
    }

    #[test]
    fn forms() {
        let s = Secret::with_form("abc", SecretForm::FortiosEncrypted);
        assert!(!s.is_usable());
        assert_eq!(s.form(), SecretForm::FortiosEncrypted);
        assert_eq!(s.len(), 3);
    }
}
