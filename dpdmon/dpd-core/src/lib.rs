//! Sans-IO dead peer detection (DPD) core for Haven's `dpdmon`.
pub mod wheel;
