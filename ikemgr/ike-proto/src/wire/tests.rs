use super::*;

fn hdr(exchange: ExchangeType, mid: u32) -> Header {
    Header {
        spi_i: 0x0102_0304_0506_0708,
        spi_r: 0,
        next_payload: PayloadType::NONE,
        version: IKEV2_VERSION,
        exchange,
        flags: Flags::new(true, false),
        message_id: mid,
        length: 0,
    }
}

fn sample_sa() -> Vec<Proposal> {
    vec![
        Proposal {
            num: 1,
            protocol: ProtocolId::IKE,
            spi: vec![],
            transforms: vec![
                Transform::new(TransformType::ENCR, EncrId::AES_CBC.0, Some(128)),
                Transform::new(TransformType::INTEG, IntegId::HMAC_SHA1_96.0, None),
                Transform::new(TransformType::PRF, PrfId::HMAC_SHA1.0, None),
                Transform::new(TransformType::DH, DhGroup::MODP1024.0, None),
            ],
        },
        Proposal {
            num: 2,
            protocol: ProtocolId::ESP,
            spi: vec![1, 2, 3, 4],
            transforms: vec![Transform {
                ty: TransformType(200),
                id: 999,
                attrs: vec![
                    Attribute::Tlv(AttributeType(77), vec![9, 9, 9]),
                    Attribute::Tv(AttributeType::KEY_LENGTH, 256),
                ],
            }],
        },
    ]
}

/// One message per payload kind, used by the round-trip and fuzz tests.
pub(crate) fn corpus() -> Vec<Vec<u8>> {
    let init = Message {
        header: hdr(ExchangeType::IKE_SA_INIT, 0),
        payloads: vec![
            Payload::Sa(sample_sa()),
            Payload::Ke(KePayload {
                group: DhGroup::MODP1024,
                data: vec![7; 128],
            }),
            Payload::Nonce(vec![1; 32]),
            Payload::Notify(NotifyPayload::new(
                NotifyType::NAT_DETECTION_SOURCE_IP,
                vec![2; 20],
            )),
            Payload::Notify(NotifyPayload {
                protocol: ProtocolId::ESP,
                spi: vec![0xaa, 0xbb, 0xcc, 0xdd],
                ty: NotifyType(40000),
                data: vec![],
            }),
            Payload::VendorId(b"haven".to_vec()),
            Payload::CertReq(CertEncoding::X509_SIG, vec![3; 20]),
        ],
        sk_offset: None,
    };
    let auth_inner = vec![
        Payload::IdI(IdPayload::fqdn("gw.example")),
        Payload::Cert(CertEncoding::X509_SIG, vec![4; 10]),
        Payload::Auth(AuthPayload {
            method: AuthMethod::SHARED_KEY_MIC,
            data: vec![5; 20],
        }),
        Payload::Sa(sample_sa()),
        Payload::TsI(vec![
            TrafficSelector::subnet("10.0.0.0".parse().unwrap(), 8),
            TrafficSelector::subnet("2001:db8::".parse().unwrap(), 32),
            TrafficSelector {
                ts_type: TsType(9),
                ip_proto: 6,
                start_port: 1,
                end_port: 2,
                start: vec![1, 2, 3],
                end: vec![],
            },
        ]),
        Payload::TsR(vec![TrafficSelector::range(
            "0.0.0.0".parse().unwrap(),
            "255.255.255.255".parse().unwrap(),
        )]),
        Payload::Delete(DeletePayload {
            protocol: ProtocolId::ESP,
            spi_size: 4,
            spis: vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8]],
        }),
        Payload::Unknown {
            ty: PayloadType::CP,
            critical: true,
            data: vec![1, 0, 0, 0],
        },
    ];
    let mut inner = Vec::new();
    let first = encode_chain(&auth_inner, &mut inner);
    let auth = Message {
        header: hdr(ExchangeType::IKE_AUTH, 1),
        payloads: vec![Payload::Sk {
            first_inner: first,
            body: inner.clone(),
        }],
        sk_offset: None,
    };
    let mut inner_only = vec![first.0];
    inner_only.extend_from_slice(&inner);
    let frag = Message {
        header: hdr(ExchangeType::IKE_AUTH, 1),
        payloads: vec![Payload::Skf {
            first_inner: PayloadType::IDI,
            fragment: 1,
            total: 3,
            body: vec![0x55; 40],
        }],
        sk_offset: None,
    };
    vec![init.encode(), auth.encode(), frag.encode(), inner_only]
}

#[test]
fn every_payload_round_trips() {
    for bytes in corpus().iter().take(3) {
        let m = Message::decode(bytes).unwrap();
        assert_eq!(&m.encode(), bytes);
    }
    // The inner chain of the AUTH sample decodes to what was encoded.
    let c = corpus();
    let (first, inner) = c[3].split_first().unwrap();
    let (p, sk) = decode_chain(PayloadType(*first), inner).unwrap();
    assert_eq!(sk, None);
    assert_eq!(p.len(), 8);
    let mut again = Vec::new();
    encode_chain(&p, &mut again);
    assert_eq!(&again, inner);
    match &p[4] {
        Payload::TsI(ts) => {
            assert_eq!(
                ts[0].addr_range().unwrap(),
                (
                    "10.0.0.0".parse().unwrap(),
                    "10.255.255.255".parse().unwrap()
                )
            );
            assert_eq!(ts[2].ts_type, TsType(9));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn header_fields_and_sk_offset() {
    let c = corpus();
    let m = Message::decode(&c[1]).unwrap();
    assert_eq!(m.header.exchange, ExchangeType::IKE_AUTH);
    assert_eq!(m.header.message_id, 1);
    assert!(m.header.flags.initiator());
    assert!(!m.header.flags.response());
    assert_eq!(m.sk_offset, Some(HEADER_LEN));
    assert_eq!(m.header.next_payload, PayloadType::SK);
    let f = Message::decode(&c[2]).unwrap();
    assert!(matches!(
        f.payloads[0],
        Payload::Skf {
            fragment: 1,
            total: 3,
            ..
        }
    ));
}

#[test]
fn unknown_codes_round_trip_and_print() {
    assert_eq!(format!("{:?}", NotifyType(40000)), "NotifyType(40000)");
    assert_eq!(format!("{:?}", NotifyType::COOKIE), "COOKIE");
    assert_eq!(format!("{}", DhGroup::CURVE25519), "CURVE25519");
    let m = Message::decode(&corpus()[0]).unwrap();
    match &m.payloads[4] {
        Payload::Notify(n) => assert_eq!(n.ty, NotifyType(40000)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn truncation_is_message_too_short_or_length_lie() {
    let c = corpus();
    let full = &c[0];
    for cut in 0..full.len() {
        let e = Message::decode(&full[..cut]).unwrap_err();
        if cut < HEADER_LEN {
            assert!(
                matches!(e, DecodeError::MessageTooShort { .. }),
                "{cut}: {e:?}"
            );
        } else {
            assert!(
                matches!(e, DecodeError::LengthMismatch { .. }),
                "{cut}: {e:?}"
            );
        }
    }
}

#[test]
fn trailing_data_and_length_lies_are_rejected() {
    let mut m = corpus()[0].clone();
    m.push(0);
    assert!(matches!(
        Message::decode(&m),
        Err(DecodeError::LengthMismatch { .. })
    ));
    // Fix the header length: now the chain has a trailing byte.
    let len = u32::try_from(m.len()).unwrap();
    m[24..28].copy_from_slice(&len.to_be_bytes());
    assert!(matches!(
        Message::decode(&m),
        Err(DecodeError::TrailingData { .. })
    ));
    // First payload (SA) claims more than there is.
    let mut m = corpus()[0].clone();
    m[30] = 0xff;
    m[31] = 0xff;
    assert!(matches!(
        Message::decode(&m),
        Err(DecodeError::LengthMismatch {
            what: "payload",
            ..
        })
    ));
    // Generic length below the header size.
    let mut m = corpus()[0].clone();
    m[30] = 0;
    m[31] = 2;
    assert!(matches!(
        Message::decode(&m),
        Err(DecodeError::LengthMismatch { .. })
    ));
}

#[test]
fn bad_versions_and_flags() {
    let mut m = corpus()[0].clone();
    m[17] = 0x10;
    assert_eq!(
        Message::decode(&m),
        Err(DecodeError::InvalidMajorVersion(1))
    );
    // Proposal "last" flag claims more proposals than exist: the SA payload
    // body starts at 32; the second proposal's flag byte follows the first.
    let mut m = corpus()[0].clone();
    let first_prop_len = usize::from(u16::from_be_bytes([m[34], m[35]]));
    m[32 + first_prop_len] = 2;
    assert!(Message::decode(&m).is_err());
}

#[test]
fn traffic_selector_type_length_checked() {
    // An IPv4 range with a length of 24 (one for IPv6 would be 40) is a lie.
    let ts = TrafficSelector::subnet("10.1.0.0".parse().unwrap(), 16);
    let mut out = Vec::new();
    encode_selectors(&[ts], &mut out);
    out[4] = TsType::IPV6_ADDR_RANGE.0;
    assert!(decode_selectors(&mut Reader::new(&out)).is_err());
}

/// xorshift64*, deterministic so the mutation test is reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % (n.max(1) as u64)).unwrap()
    }
}

#[test]
fn fuzz_body_over_corpus_and_mutations() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut inputs = 0usize;
    for seed in corpus() {
        fuzz_decode(&seed);
        for pos in 0..seed.len() {
            for bit in [0x01u8, 0x80, 0xff] {
                let mut m = seed.clone();
                m[pos] ^= bit;
                fuzz_decode(&m);
                inputs += 1;
            }
        }
        for _ in 0..3000 {
            let mut m = seed.clone();
            for _ in 0..1 + rng.below(4) {
                match rng.below(4) {
                    0 if !m.is_empty() => {
                        let i = rng.below(m.len());
                        m[i] = rng.next() as u8;
                    }
                    0 | 1 => m.truncate(rng.below(m.len() + 1)),
                    2 => {
                        let i = rng.below(m.len() + 1);
                        m.insert(i, rng.next() as u8);
                    }
                    _ => {
                        if m.len() >= 2 {
                            let i = rng.below(m.len() - 1);
                            let v = u16::from_be_bytes([m[i], m[i + 1]]).wrapping_add(4);
                            m[i..i + 2].copy_from_slice(&v.to_be_bytes());
                        }
                    }
                }
            }
            fuzz_decode(&m);
            inputs += 1;
        }
    }
    assert!(inputs > 10_000);
}

#[test]
fn message_id_sync_data_round_trips_and_refuses_other_lengths() {
    // RFC 6311 §5: nonce, EXPECTED_SEND_REQ_MESSAGE_ID, EXPECTED_RECV_REQ_MESSAGE_ID.
    let m = MessageIdSync {
        nonce: 0x1a2b_0a55,
        send: 14,
        recv: 1,
    };
    let b = m.encode();
    assert_eq!(
        b,
        [0x1a, 0x2b, 0x0a, 0x55, 0, 0, 0, 14, 0, 0, 0, 1],
        "seed 002's request: nonce=1a2b0a55 expected send/recv msg IDs=14/1"
    );
    assert_eq!(MessageIdSync::decode(&b), Ok(m));
    for n in 0..b.len() {
        assert!(MessageIdSync::decode(&b[..n]).is_err(), "{n} octets");
    }
    let mut long = b.clone();
    long.push(0);
    assert!(matches!(
        MessageIdSync::decode(&long),
        Err(DecodeError::TrailingData { extra: 1, .. })
    ));
    assert_eq!(NotifyType::IKEV2_MESSAGE_ID_SYNC.0, 16422);
    assert_eq!(NotifyType::IKEV2_MESSAGE_ID_SYNC_SUPPORTED.0, 16420);
}
