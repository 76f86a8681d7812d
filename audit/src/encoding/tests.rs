use super::*;

#[test]
fn base64_round_trips_and_matches_known_vectors() {
    let vectors = [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ];
    for (plain, encoded) in vectors {
        assert_eq!(base64_encode(plain.as_bytes()), encoded);
        assert_eq!(base64_decode(encoded).as_deref(), Some(plain.as_bytes()));
    }
    let all: Vec<u8> = (0..=255).collect();
    assert_eq!(base64_decode(&base64_encode(&all)), Some(all));
    for bad in ["Zg=", "Z===", "Zg==Zg==", "Z!==", "A=BC"] {
        assert_eq!(base64_decode(bad), None, "{bad}");
    }
}

#[test]
fn hex_round_trips() {
    let all: Vec<u8> = (0..=255).collect();
    assert_eq!(from_hex(&to_hex(&all)), Some(all));
    assert_eq!(from_hex("0A"), Some(vec![10]));
    assert_eq!(from_hex("0"), None);
    assert_eq!(from_hex("zz"), None);
}

#[test]
fn lower_hex_decoding_is_strict() {
    assert_eq!(decode_lower_hex::<2>("0aff"), Some([0x0a, 0xff]));
    assert_eq!(decode_lower_hex::<2>("0AFF"), None);
    assert_eq!(decode_lower_hex::<2>("0aff00"), None);
    assert_eq!(decode_lower_hex::<2>("0af"), None);
}

#[test]
fn shown_values_are_escaped_and_cut() {
    assert_eq!(shown("a\nb"), "a\\nb");
    let long = "x".repeat(60);
    assert_eq!(shown(&long), format!("{}…", "x".repeat(48)));
    assert_eq!(shown(&"y".repeat(48)), "y".repeat(48));
}
