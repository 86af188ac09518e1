//! Per-tunnel DPD settings, the retry schedules and the detection budget.

use serde::{Deserialize, Serialize};

use crate::DpdError;

/// Largest number of probes in one round (FortiOS allows 0..=10; PAN-OS uses 10).
pub const MAX_TRIES: u32 = 1000;

/// `set dpd`: when a probe round starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Never probe, never declare the peer dead.
    Disable,
    /// Probe when nothing was received from the peer for the idle interval.
    OnIdle,
    /// Probe only when we sent traffic and nothing came back for the idle
    /// interval (the FortiOS default).
    OnDemand,
    /// Probe every interval whatever the traffic (Cisco `periodic`).
    Periodic,
}

impl Mode {
    /// The FortiOS spelling used in configs and views.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Disable => "disable",
            Mode::OnIdle => "on-idle",
            Mode::OnDemand => "on-demand",
            Mode::Periodic => "periodic",
        }
    }

    /// Parses the FortiOS spelling.
    pub fn from_name(s: &str) -> Option<Mode> {
        Some(match s {
            "disable" => Mode::Disable,
            "on-idle" => Mode::OnIdle,
            "on-demand" => Mode::OnDemand,
            "periodic" => Mode::Periodic,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one probe round is paced.
///
/// A round is `tries` transmissions of one probe (one IKEv2 message ID);
/// after transmission `k` the core waits [`Schedule::wait_ms`]`(k)` for any
/// proof of life, then sends transmission `k + 1`, or, after the last one,
/// declares the peer dead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Schedule {
    /// FortiOS: `dpd-retrycount` probes `dpd-retryinterval` apart; the same
    /// interval is the idle threshold that starts a round. A `retry_count`
    /// of 0 is read as 1 (a round always sends one probe).
    Fixed {
        retry_count: u32,
        retry_interval_ms: u64,
    },
    /// PAN-OS style backoff: a round starts after `idle_ms` (the "liveness
    /// check" interval); the wait after transmission `k` is
    /// `min(initial_ms * 2^(k-1), max_ms)`; `tries` transmissions.
    Exponential {
        idle_ms: u64,
        initial_ms: u64,
        max_ms: u64,
        tries: u32,
    },
}

impl Schedule {
    /// FortiOS defaults: 3 probes, 20 s apart.
    pub const FORTIOS_DEFAULT: Schedule = Schedule::Fixed {
        retry_count: 3,
        retry_interval_ms: 20_000,
    };
    /// Seed 004 (PAN-OS IKEv2 liveness check): idle 5 s, then waits of
    /// 1, 2, 4, 8, 16, 32, 64, 64, 64, 64 s (319 s).
    pub const PAN_OS: Schedule = Schedule::Exponential {
        idle_ms: 5_000,
        initial_ms: 1_000,
        max_ms: 64_000,
        tries: 10,
    };

    /// Silence (or, for on-demand, unanswered traffic) that starts a round;
    /// for periodic mode the time between rounds.
    pub fn idle_ms(&self) -> u64 {
        match *self {
            Schedule::Fixed {
                retry_interval_ms, ..
            } => retry_interval_ms,
            Schedule::Exponential { idle_ms, .. } => idle_ms,
        }
    }

    /// Transmissions per round (the view's `retry=`).
    pub fn tries(&self) -> u32 {
        match *self {
            Schedule::Fixed { retry_count, .. } => retry_count.max(1),
            Schedule::Exponential { tries, .. } => tries,
        }
    }

    /// The wait after transmission `attempt` (1-based).
    pub fn wait_ms(&self, attempt: u32) -> u64 {
        match *self {
            Schedule::Fixed {
                retry_interval_ms, ..
            } => retry_interval_ms,
            Schedule::Exponential {
                initial_ms, max_ms, ..
            } => {
                let shift = attempt.saturating_sub(1);
                let factor = 1u64.checked_shl(shift).unwrap_or(u64::MAX);
                initial_ms.saturating_mul(factor).min(max_ms)
            }
        }
    }

    /// Sum of the waits of a whole round: first probe to verdict.
    pub fn round_ms(&self) -> u64 {
        (1..=self.tries()).fold(0u64, |acc, k| acc.saturating_add(self.wait_ms(k)))
    }

    /// Checks the values a round needs.
    pub fn validate(&self) -> Result<(), DpdError> {
        match *self {
            Schedule::Fixed {
                retry_count,
                retry_interval_ms,
            } => {
                if retry_interval_ms == 0 {
                    return Err(DpdError::InvalidSettings("retry interval must be > 0"));
                }
                if retry_count > MAX_TRIES {
                    return Err(DpdError::InvalidSettings("retry count above 1000"));
                }
            }
            Schedule::Exponential {
                idle_ms,
                initial_ms,
                max_ms,
                tries,
            } => {
                if idle_ms == 0 || initial_ms == 0 {
                    return Err(DpdError::InvalidSettings(
                        "idle and initial intervals must be > 0",
                    ));
                }
                if max_ms < initial_ms {
                    return Err(DpdError::InvalidSettings("maximum wait below initial wait"));
                }
                if tries == 0 || tries > MAX_TRIES {
                    return Err(DpdError::InvalidSettings("tries must be 1..=1000"));
                }
            }
        }
        Ok(())
    }
}

/// HA role of the tunnel on this member (from hasyncd; `Owner` until
/// hasyncd says otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// `sync-primary`: this member probes the tunnel.
    Owner,
    /// `standby`: a synced copy; never probes.
    Standby,
}

/// Everything the core needs to know about one tunnel's DPD configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Settings {
    pub mode: Mode,
    pub schedule: Schedule,
    pub role: Role,
}

impl Settings {
    /// FortiOS phase1 settings: `set dpd MODE`, `dpd-retrycount`,
    /// `dpd-retryinterval` (in ms), owned locally.
    pub fn fortios(mode: Mode, retry_count: u32, retry_interval_ms: u64) -> Settings {
        Settings {
            mode,
            schedule: Schedule::Fixed {
                retry_count,
                retry_interval_ms,
            },
            role: Role::Owner,
        }
    }

    /// Checks the schedule (a disabled mode accepts any schedule).
    pub fn validate(&self) -> Result<(), DpdError> {
        if self.mode == Mode::Disable {
            return Ok(());
        }
        self.schedule.validate()
    }
}

/// The detection budget: the longest time from the start of a peer's
/// silence to the dead verdict, `None` for `disable`.
///
/// Always `idle + round`, where `idle` is [`Schedule::idle_ms`] and `round`
/// is [`Schedule::round_ms`]; what "start of silence" means depends on the
/// mode:
///
/// | mode | silence starts at | verdict at |
/// |---|---|---|
/// | on-idle | the last proof of life (inbound ESP, any authenticated IKE message, a probe reply) | exactly start + budget |
/// | on-demand | the first outbound packet left unanswered (the first `last_tx` the datapath reports after the last proof of life) | exactly start + budget |
/// | periodic | the last proof of life | at most start + budget (a round starts every `idle`; the verdict is `round` after the start of the first unanswered round) |
///
/// "Exactly" is up to the driver's timer latency: the core never decides
/// early, and decides on the first `handle_timeout` at or after the time.
/// Seed 000 (on-idle, 60 s, 3 retries): probes at 60, 120 and 180 s of
/// silence, "retry timeout" at 240 s = 60 + 3 × 60. Seed 004 (PAN-OS):
/// 5 + 319 = 324 s. FortiOS defaults (20 s, 3): 80 s.
///
/// A standby tunnel never decides; after a promotion, silence is counted
/// from the promotion at the earliest.
pub fn dead_after_ms(settings: &Settings) -> Option<u64> {
    if settings.mode == Mode::Disable {
        return None;
    }
    Some(
        settings
            .schedule
            .idle_ms()
            .saturating_add(settings.schedule.round_ms()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_from_the_seeds() {
        // Seed 000: on-idle, dpd-retryinterval 60, three probes then retry timeout.
        let s = Settings::fortios(Mode::OnIdle, 3, 60_000);
        assert_eq!(dead_after_ms(&s), Some(240_000));
        // FortiOS defaults.
        let s = Settings::fortios(Mode::OnDemand, 3, 20_000);
        assert_eq!(dead_after_ms(&s), Some(80_000));
        // Seed 004: 1+2+4+8+16+32+64+64+64+64 = 319 s after a 5 s idle check.
        let p = Settings {
            mode: Mode::OnIdle,
            schedule: Schedule::PAN_OS,
            role: Role::Owner,
        };
        assert_eq!(Schedule::PAN_OS.round_ms(), 319_000);
        assert_eq!(dead_after_ms(&p), Some(324_000));
        let waits: Vec<u64> = (1..=10)
            .map(|k| Schedule::PAN_OS.wait_ms(k) / 1000)
            .collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 32, 64, 64, 64, 64]);
        // Disable never decides.
        let d = Settings::fortios(Mode::Disable, 3, 60_000);
        assert_eq!(dead_after_ms(&d), None);
        // A retry count of 0 still sends one probe.
        let z = Settings::fortios(Mode::OnIdle, 0, 10_000);
        assert_eq!(z.schedule.tries(), 1);
        assert_eq!(dead_after_ms(&z), Some(20_000));
    }

    #[test]
    fn huge_values_saturate() {
        let s = Schedule::Exponential {
            idle_ms: u64::MAX,
            initial_ms: u64::MAX / 2,
            max_ms: u64::MAX,
            tries: 1000,
        };
        assert!(s.validate().is_ok());
        assert_eq!(s.wait_ms(999), u64::MAX);
        assert_eq!(s.round_ms(), u64::MAX);
    }

    #[test]
    fn validation() {
        assert!(Schedule::Fixed {
            retry_count: 3,
            retry_interval_ms: 0
        }
        .validate()
        .is_err());
        assert!(Schedule::Exponential {
            idle_ms: 5,
            initial_ms: 10,
            max_ms: 5,
            tries: 3
        }
        .validate()
        .is_err());
        assert!(Schedule::Exponential {
            idle_ms: 5,
            initial_ms: 1,
            max_ms: 5,
            tries: 0
        }
        .validate()
        .is_err());
        let mut s = Settings::fortios(Mode::Disable, 3, 0);
        assert!(s.validate().is_ok());
        s.mode = Mode::Periodic;
        assert!(s.validate().is_err());
        for m in [Mode::Disable, Mode::OnIdle, Mode::OnDemand, Mode::Periodic] {
            assert_eq!(Mode::from_name(m.as_str()), Some(m));
        }
        assert_eq!(Mode::from_name("sometimes"), None);
    }
}
