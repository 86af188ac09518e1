//! Bodies of the fuzz targets in `bus-schema/fuzz`, shared with a unit test that runs them
//! over a seed corpus on stable Rust. Not part of the API.

use crate::codec::{decode, decode_request, encode, encode_request};

/// A decoder that accepted some input did not reproduce itself on re-encoding.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unstable(pub String);

/// decode -> encode -> decode must give the same value, and the second encoding must equal the
/// first. Inputs that do not decode are fine (the decoder must only not panic).
pub fn check_envelope(data: &[u8]) -> Result<(), Unstable> {
    let Ok(env) = decode(data) else { return Ok(()) };
    let bytes = encode(&env);
    let again = decode(&bytes).map_err(|e| Unstable(format!("re-decode failed: {e}")))?;
    if again != env {
        return Err(Unstable(format!("{env:?} became {again:?}")));
    }
    if encode(&again) != bytes {
        return Err(Unstable("second encoding differs".into()));
    }
    Ok(())
}

/// Same property for control requests.
pub fn check_request(data: &[u8]) -> Result<(), Unstable> {
    let Ok(req) = decode_request(data) else {
        return Ok(());
    };
    let bytes = encode_request(&req);
    let again = decode_request(&bytes).map_err(|e| Unstable(format!("re-decode failed: {e}")))?;
    if again != req {
        return Err(Unstable(format!("{req:?} became {again:?}")));
    }
    if encode_request(&again) != bytes {
        return Err(Unstable("second encoding differs".into()));
    }
    Ok(())
}
