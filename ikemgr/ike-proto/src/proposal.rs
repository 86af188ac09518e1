//! Algorithm suites, FortiOS proposal names, and SA proposal building and
//! selection (RFC 7296 §2.7, §3.3).

use crate::crypto::{Encr, Integ, Prf};
use crate::wire::{
    DhGroup, EncrId, EsnId, IntegId, PrfId, Proposal, ProtocolId, Transform, TransformType,
};

/// Configuration errors: a proposal or group name we cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposalError {
    /// Not a FortiOS proposal name we implement.
    #[error("unknown or unsupported proposal {0:?}")]
    UnknownProposal(String),
    /// Not a DH group we implement.
    #[error("unknown or unsupported dhgrp {0:?}")]
    UnknownGroup(String),
}

/// Algorithms of an IKE SA (one of each transform type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IkeSuite {
    /// ENCR.
    pub encr: Encr,
    /// INTEG (None with AEAD).
    pub integ: Option<Integ>,
    /// PRF.
    pub prf: Prf,
    /// DH group.
    pub dh: DhGroup,
}

/// Algorithms of a CHILD SA (ESP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EspSuite {
    /// ENCR.
    pub encr: Encr,
    /// INTEG (None with AEAD).
    pub integ: Option<Integ>,
    /// Extended sequence numbers.
    pub esn: bool,
    /// PFS group (CREATE_CHILD_SA only).
    pub dh: Option<DhGroup>,
}

/// One phase1 proposal name without its groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IkeAlgs {
    /// ENCR.
    pub encr: Encr,
    /// INTEG (None with AEAD).
    pub integ: Option<Integ>,
    /// PRF.
    pub prf: Prf,
}

/// One phase2 proposal name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EspAlgs {
    /// ENCR.
    pub encr: Encr,
    /// INTEG (None with AEAD).
    pub integ: Option<Integ>,
}

fn hash_integ(h: &str) -> Option<(Integ, Prf)> {
    Some(match h {
        "sha1" => (Integ::HmacSha1_96, Prf::HmacSha1),
        "sha256" => (Integ::HmacSha256_128, Prf::HmacSha256),
        "sha384" => (Integ::HmacSha384_192, Prf::HmacSha384),
        "sha512" => (Integ::HmacSha512_256, Prf::HmacSha512),
        _ => return None,
    })
}

fn cipher(c: &str) -> Option<Encr> {
    Some(match c {
        "aes128" => Encr::AesCbc(16),
        "aes256" => Encr::AesCbc(32),
        "aes128gcm" => Encr::AesGcm16(16),
        "aes256gcm" => Encr::AesGcm16(32),
        "chacha20poly1305" => Encr::ChaCha20Poly1305,
        _ => return None,
    })
}

/// Parses one FortiOS phase1 `proposal` name: `aes128-sha1`,
/// `aes256-sha512`, `aes128gcm-prfsha256`, `chacha20poly1305-prfsha256`…
pub fn phase1_name(name: &str) -> Result<IkeAlgs, ProposalError> {
    let bad = || ProposalError::UnknownProposal(name.to_string());
    let (c, h) = name.split_once('-').ok_or_else(bad)?;
    let encr = cipher(c).ok_or_else(bad)?;
    if encr.is_aead() {
        let h = h.strip_prefix("prf").ok_or_else(bad)?;
        let (_, prf) = hash_integ(h).ok_or_else(bad)?;
        Ok(IkeAlgs {
            encr,
            integ: None,
            prf,
        })
    } else {
        let (integ, prf) = hash_integ(h).ok_or_else(bad)?;
        Ok(IkeAlgs {
            encr,
            integ: Some(integ),
            prf,
        })
    }
}

/// Parses one FortiOS phase2 `proposal` name: `aes128-sha1`,
/// `aes256-sha256`, `aes128gcm`, `aes256gcm`, `chacha20poly1305`.
pub fn phase2_name(name: &str) -> Result<EspAlgs, ProposalError> {
    let bad = || ProposalError::UnknownProposal(name.to_string());
    if let Some(encr) = cipher(name).filter(|e| e.is_aead()) {
        return Ok(EspAlgs { encr, integ: None });
    }
    let (c, h) = name.split_once('-').ok_or_else(bad)?;
    let encr = cipher(c).filter(|e| !e.is_aead()).ok_or_else(bad)?;
    let (integ, _) = hash_integ(h).ok_or_else(bad)?;
    Ok(EspAlgs {
        encr,
        integ: Some(integ),
    })
}

/// Parses a `set proposal` value (several names separated by spaces).
pub fn phase1_list(value: &str) -> Result<Vec<IkeAlgs>, ProposalError> {
    value.split_whitespace().map(phase1_name).collect()
}

/// Parses a phase2 `set proposal` value.
pub fn phase2_list(value: &str) -> Result<Vec<EspAlgs>, ProposalError> {
    value.split_whitespace().map(phase2_name).collect()
}

/// Parses a `set dhgrp` value such as `14 5` or `21`.
pub fn dhgrp_list(value: &str) -> Result<Vec<DhGroup>, ProposalError> {
    value
        .split_whitespace()
        .map(|t| {
            t.parse::<u16>()
                .ok()
                .map(DhGroup)
                .filter(|g| crate::crypto::SUPPORTED_GROUPS.contains(g))
                .ok_or_else(|| ProposalError::UnknownGroup(t.to_string()))
        })
        .collect()
}

fn encr_transform(e: Encr) -> Transform {
    let (id, bits) = e.id();
    Transform::new(TransformType::ENCR, id.0, bits)
}

/// SA payload proposals for an IKE SA: one proposal per name, each listing
/// every group. `spi` is empty in IKE_SA_INIT, 8 octets when rekeying.
pub fn ike_proposals(algs: &[IkeAlgs], groups: &[DhGroup], spi: &[u8]) -> Vec<Proposal> {
    algs.iter()
        .enumerate()
        .map(|(i, a)| {
            let mut t = vec![encr_transform(a.encr)];
            t.push(Transform::new(TransformType::PRF, a.prf.id().0, None));
            if let Some(ig) = a.integ {
                t.push(Transform::new(TransformType::INTEG, ig.id().0, None));
            }
            for g in groups {
                t.push(Transform::new(TransformType::DH, g.0, None));
            }
            Proposal {
                num: u8::try_from(i + 1).unwrap_or(u8::MAX),
                protocol: ProtocolId::IKE,
                spi: spi.to_vec(),
                transforms: t,
            }
        })
        .collect()
}

/// SA payload proposals for ESP; `pfs` lists DH groups (empty: no PFS).
pub fn esp_proposals(algs: &[EspAlgs], pfs: &[DhGroup], spi: u32) -> Vec<Proposal> {
    algs.iter()
        .enumerate()
        .map(|(i, a)| {
            let mut t = vec![encr_transform(a.encr)];
            if let Some(ig) = a.integ {
                t.push(Transform::new(TransformType::INTEG, ig.id().0, None));
            }
            for g in pfs {
                t.push(Transform::new(TransformType::DH, g.0, None));
            }
            t.push(Transform::new(TransformType::ESN, EsnId::NO_ESN.0, None));
            Proposal {
                num: u8::try_from(i + 1).unwrap_or(u8::MAX),
                protocol: ProtocolId::ESP,
                spi: spi.to_be_bytes().to_vec(),
                transforms: t,
            }
        })
        .collect()
}

fn has(p: &Proposal, ty: TransformType, id: u16, key: Option<u16>) -> bool {
    p.transforms
        .iter()
        .any(|t| t.ty == ty && t.id == id && t.key_length() == key)
}

fn types(p: &Proposal, ty: TransformType) -> impl Iterator<Item = &Transform> {
    p.transforms.iter().filter(move |t| t.ty == ty)
}

/// Responder's choice among the peer's IKE proposals (peer order first).
/// Prefers `ke_group` (the group of the peer's KE payload) when acceptable.
/// Returns the proposal to send back (one transform per type) and the suite.
pub fn select_ike(
    offered: &[Proposal],
    ours: &[IkeAlgs],
    groups: &[DhGroup],
    ke_group: Option<DhGroup>,
) -> Option<(Proposal, IkeSuite)> {
    for p in offered.iter().filter(|p| p.protocol == ProtocolId::IKE) {
        for a in ours {
            let (eid, ebits) = a.encr.id();
            if !has(p, TransformType::ENCR, eid.0, ebits)
                || !has(p, TransformType::PRF, a.prf.id().0, None)
            {
                continue;
            }
            match a.integ {
                Some(i) if !has(p, TransformType::INTEG, i.id().0, None) => continue,
                None if types(p, TransformType::INTEG).any(|t| t.id != IntegId::NONE.0) => continue,
                _ => {}
            }
            let offered_groups: Vec<DhGroup> =
                types(p, TransformType::DH).map(|t| DhGroup(t.id)).collect();
            let dh = match ke_group {
                Some(k) if groups.contains(&k) && offered_groups.contains(&k) => k,
                _ => match groups.iter().find(|g| offered_groups.contains(g)) {
                    Some(g) => *g,
                    None => continue,
                },
            };
            let suite = IkeSuite {
                encr: a.encr,
                integ: a.integ,
                prf: a.prf,
                dh,
            };
            return Some((single_ike(p.num, &suite, &p.spi), suite));
        }
    }
    None
}

fn single_ike(num: u8, s: &IkeSuite, spi: &[u8]) -> Proposal {
    let mut t = vec![encr_transform(s.encr)];
    t.push(Transform::new(TransformType::PRF, s.prf.id().0, None));
    if let Some(i) = s.integ {
        t.push(Transform::new(TransformType::INTEG, i.id().0, None));
    }
    t.push(Transform::new(TransformType::DH, s.dh.0, None));
    Proposal {
        num,
        protocol: ProtocolId::IKE,
        spi: spi.to_vec(),
        transforms: t,
    }
}

/// Builds the single-transform IKE proposal a responder returns.
pub fn ike_reply(num: u8, s: &IkeSuite, spi: &[u8]) -> Proposal {
    single_ike(num, s, spi)
}

/// Initiator's check of the responder's choice: exactly one proposal with one
/// transform of each type, all of which we offered. Returns the suite.
pub fn accept_ike_reply(
    reply: &[Proposal],
    ours: &[IkeAlgs],
    groups: &[DhGroup],
) -> Option<IkeSuite> {
    let [p] = reply else { return None };
    if p.protocol != ProtocolId::IKE {
        return None;
    }
    let one = |ty| {
        let mut it = types(p, ty);
        let first = it.next();
        if it.next().is_some() {
            None
        } else {
            first
        }
    };
    let e = one(TransformType::ENCR)?;
    let encr = Encr::from_id(EncrId(e.id), e.key_length())?;
    let prf = Prf::from_id(PrfId(one(TransformType::PRF)?.id))?;
    let integ = match one(TransformType::INTEG) {
        Some(t) if t.id != IntegId::NONE.0 => Some(Integ::from_id(IntegId(t.id))?),
        _ => None,
    };
    let dh = DhGroup(one(TransformType::DH)?.id);
    let ok = ours
        .iter()
        .any(|a| a.encr == encr && a.prf == prf && a.integ == integ)
        && groups.contains(&dh)
        && (encr.is_aead() == integ.is_none());
    ok.then_some(IkeSuite {
        encr,
        integ,
        prf,
        dh,
    })
}

/// Responder's choice among ESP proposals. `pfs`: acceptable groups when a
/// KE is present (CREATE_CHILD_SA); None in IKE_AUTH (DH transforms are
/// ignored there). Returns the reply proposal (carrying `our_spi`), the
/// suite and the peer's SPI.
pub fn select_esp(
    offered: &[Proposal],
    ours: &[EspAlgs],
    pfs: Option<&[DhGroup]>,
    our_spi: u32,
) -> Option<(Proposal, EspSuite, u32)> {
    for p in offered.iter().filter(|p| p.protocol == ProtocolId::ESP) {
        let Ok(spi_bytes) = <[u8; 4]>::try_from(p.spi.as_slice()) else {
            continue;
        };
        for a in ours {
            let (eid, ebits) = a.encr.id();
            if !has(p, TransformType::ENCR, eid.0, ebits) {
                continue;
            }
            match a.integ {
                Some(i) if !has(p, TransformType::INTEG, i.id().0, None) => continue,
                None if types(p, TransformType::INTEG).any(|t| t.id != IntegId::NONE.0) => continue,
                _ => {}
            }
            // ESN: we only do 32-bit sequence numbers.
            let esn_ok = types(p, TransformType::ESN).count() == 0
                || has(p, TransformType::ESN, EsnId::NO_ESN.0, None);
            if !esn_ok {
                continue;
            }
            let offered_dh: Vec<DhGroup> = types(p, TransformType::DH)
                .map(|t| DhGroup(t.id))
                .filter(|g| *g != DhGroup::NONE)
                .collect();
            let dh = match pfs {
                None => None,
                Some([]) => {
                    if !offered_dh.is_empty() && !types(p, TransformType::DH).any(|t| t.id == 0) {
                        continue;
                    }
                    None
                }
                Some(groups) => match groups.iter().find(|g| offered_dh.contains(g)) {
                    Some(g) => Some(*g),
                    None => continue,
                },
            };
            let suite = EspSuite {
                encr: a.encr,
                integ: a.integ,
                esn: false,
                dh,
            };
            return Some((
                esp_reply(p.num, &suite, our_spi),
                suite,
                u32::from_be_bytes(spi_bytes),
            ));
        }
    }
    None
}

/// The single-transform ESP proposal a responder returns.
pub fn esp_reply(num: u8, s: &EspSuite, spi: u32) -> Proposal {
    let mut t = vec![encr_transform(s.encr)];
    if let Some(i) = s.integ {
        t.push(Transform::new(TransformType::INTEG, i.id().0, None));
    }
    if let Some(g) = s.dh {
        t.push(Transform::new(TransformType::DH, g.0, None));
    }
    t.push(Transform::new(
        TransformType::ESN,
        if s.esn { EsnId::ESN.0 } else { EsnId::NO_ESN.0 },
        None,
    ));
    Proposal {
        num,
        protocol: ProtocolId::ESP,
        spi: spi.to_be_bytes().to_vec(),
        transforms: t,
    }
}

/// Initiator's check of the responder's ESP choice. Returns the suite and
/// the responder's SPI.
pub fn accept_esp_reply(
    reply: &[Proposal],
    ours: &[EspAlgs],
    pfs: &[DhGroup],
) -> Option<(EspSuite, u32)> {
    let [p] = reply else { return None };
    if p.protocol != ProtocolId::ESP {
        return None;
    }
    let spi = u32::from_be_bytes(<[u8; 4]>::try_from(p.spi.as_slice()).ok()?);
    let mut encr = None;
    let mut integ = None;
    let mut dh = None;
    let mut esn = false;
    for t in &p.transforms {
        match t.ty {
            TransformType::ENCR if encr.is_none() => {
                encr = Some(Encr::from_id(EncrId(t.id), t.key_length())?)
            }
            TransformType::INTEG if integ.is_none() => {
                if t.id != IntegId::NONE.0 {
                    integ = Some(Integ::from_id(IntegId(t.id))?)
                }
            }
            TransformType::DH if dh.is_none() => {
                if t.id != 0 {
                    dh = Some(DhGroup(t.id))
                }
            }
            TransformType::ESN => esn = t.id == EsnId::ESN.0,
            _ => return None,
        }
    }
    let encr = encr?;
    let ok = ours.iter().any(|a| a.encr == encr && a.integ == integ)
        && !esn
        && dh.is_none_or(|g| pfs.contains(&g));
    ok.then_some((
        EspSuite {
            encr,
            integ,
            esn,
            dh,
        },
        spi,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fortios_names_map_to_transforms() {
        let l = phase1_list(
            "aes128-sha1 aes256-sha256 aes256-sha512 aes128gcm-prfsha256 aes256gcm-prfsha384 chacha20poly1305-prfsha256",
        )
        .unwrap();
        assert_eq!(
            l[0],
            IkeAlgs {
                encr: Encr::AesCbc(16),
                integ: Some(Integ::HmacSha1_96),
                prf: Prf::HmacSha1
            }
        );
        assert_eq!(
            l[2],
            IkeAlgs {
                encr: Encr::AesCbc(32),
                integ: Some(Integ::HmacSha512_256),
                prf: Prf::HmacSha512
            }
        );
        assert_eq!(
            l[3],
            IkeAlgs {
                encr: Encr::AesGcm16(16),
                integ: None,
                prf: Prf::HmacSha256
            }
        );
        assert_eq!(
            l[4],
            IkeAlgs {
                encr: Encr::AesGcm16(32),
                integ: None,
                prf: Prf::HmacSha384
            }
        );
        assert_eq!(
            l[5],
            IkeAlgs {
                encr: Encr::ChaCha20Poly1305,
                integ: None,
                prf: Prf::HmacSha256
            }
        );
        assert!(phase1_name("3des-sha1").is_err());
        assert!(phase1_name("aes128gcm-sha256").is_err());
        assert!(phase1_name("aes128").is_err());
        let p2 = phase2_list("aes128-sha1 aes256gcm chacha20poly1305").unwrap();
        assert_eq!(
            p2[0],
            EspAlgs {
                encr: Encr::AesCbc(16),
                integ: Some(Integ::HmacSha1_96)
            }
        );
        assert_eq!(
            p2[1],
            EspAlgs {
                encr: Encr::AesGcm16(32),
                integ: None
            }
        );
        assert!(phase2_name("aes128gcm-prfsha256").is_err());
        assert_eq!(
            dhgrp_list("14 5 21 31").unwrap(),
            vec![DhGroup(14), DhGroup(5), DhGroup(21), DhGroup(31)]
        );
        assert!(dhgrp_list("14 1").is_err());
        assert!(dhgrp_list("x").is_err());
    }

    #[test]
    fn select_and_accept_ike() {
        let ini = phase1_list("aes128-sha1 aes256gcm-prfsha384").unwrap();
        let offered = ike_proposals(&ini, &[DhGroup(14), DhGroup(19)], &[]);
        let resp = phase1_list("aes256gcm-prfsha384").unwrap();
        let (reply, suite) = select_ike(
            &offered,
            &resp,
            &[DhGroup(19), DhGroup(14)],
            Some(DhGroup(14)),
        )
        .unwrap();
        assert_eq!(
            suite.dh,
            DhGroup(14),
            "prefers the KE group when acceptable"
        );
        assert_eq!(suite.encr, Encr::AesGcm16(32));
        assert_eq!(reply.num, 2);
        assert_eq!(
            accept_ike_reply(
                std::slice::from_ref(&reply),
                &ini,
                &[DhGroup(14), DhGroup(19)]
            ),
            Some(suite)
        );
        // A reply with a group we did not offer is refused.
        assert_eq!(accept_ike_reply(&[reply], &ini, &[DhGroup(19)]), None);
        // Nothing in common.
        assert!(select_ike(
            &offered,
            &phase1_list("aes256-sha512").unwrap(),
            &[DhGroup(14)],
            None
        )
        .is_none());
        assert!(select_ike(&offered, &resp, &[DhGroup(21)], None).is_none());
    }

    #[test]
    fn select_and_accept_esp() {
        let ini = phase2_list("aes128-sha1 aes128gcm").unwrap();
        let offered = esp_proposals(&ini, &[], 0x1111_2222);
        let (reply, suite, peer_spi) = select_esp(
            &offered,
            &phase2_list("aes128gcm").unwrap(),
            None,
            0xaaaa_bbbb,
        )
        .unwrap();
        assert_eq!(peer_spi, 0x1111_2222);
        assert_eq!(suite.encr, Encr::AesGcm16(16));
        assert_eq!(
            accept_esp_reply(&[reply], &ini, &[]),
            Some((suite, 0xaaaa_bbbb))
        );
        // PFS required but not offered.
        assert!(select_esp(&offered, &ini, Some(&[DhGroup(14)]), 1).is_none());
        let with_pfs = esp_proposals(&ini, &[DhGroup(31)], 5);
        let (_, s, _) = select_esp(&with_pfs, &ini, Some(&[DhGroup(31)]), 1).unwrap();
        assert_eq!(s.dh, Some(DhGroup(31)));
        // In IKE_AUTH the DH transforms are ignored.
        let (_, s, _) = select_esp(&with_pfs, &ini, None, 1).unwrap();
        assert_eq!(s.dh, None);
    }
}
