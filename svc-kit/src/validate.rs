//! Field checks for incoming requests.
//!
//! Each check names the field it refuses (`lines[2].quantity`), so the caller
//! sees INVALID_ARGUMENT with a message that says what to fix. Requests are
//! validated before anything is written.

use uuid::Uuid;

use crate::Error;

/// Longest accepted identifier (`request_id`, `customer_id`, …), in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Most lines one order may have.
pub const MAX_LINES: usize = 100;
/// Most units of one SKU in one order line.
pub const MAX_LINE_QUANTITY: i64 = 10_000;
/// Largest amount of money in one call: ten billion in major units.
pub const MAX_AMOUNT_CENTS: i64 = 1_000_000_000_000;

pub type Result<T> = std::result::Result<T, Error>;

/// An identifier chosen by the caller: 1 to 128 bytes, no control characters
/// and no invisible format characters (see [`unseen`]), not blank and without
/// whitespace around it (`"alice "` would be another customer than `"alice"`
/// to the store, and the same one to a reader).
pub fn id(field: impl Into<String>, value: &str) -> Result<()> {
    let field = field.into();
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.trim().is_empty() {
        return Err(Error::invalid(field, "must not be blank"));
    }
    if value.trim() != value {
        return Err(Error::invalid(
            field,
            "must not start or end with whitespace",
        ));
    }
    if value.len() > MAX_ID_LEN {
        return Err(Error::invalid(
            field,
            format!("is {} bytes long, the limit is {MAX_ID_LEN}", value.len()),
        ));
    }
    refuse_unseen(field, value)
}

/// A UUID in its canonical text form.
pub fn uuid(field: impl Into<String>, value: &str) -> Result<Uuid> {
    let field = field.into();
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    Uuid::try_parse(value)
        .map_err(|_| Error::invalid(field, format!("{:?} is not a UUID", truncate(value))))
}

/// A stock keeping unit: 1 to 64 of `A-Z a-z 0-9 . _ -`.
pub fn sku(field: impl Into<String>, value: &str) -> Result<()> {
    let field = field.into();
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > 64 {
        return Err(Error::invalid(
            field,
            format!("is {} bytes long, the limit is 64", value.len()),
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(Error::invalid(
            field,
            format!(
                "{:?} may only hold letters, digits, '.', '_' and '-'",
                truncate(value)
            ),
        ));
    }
    Ok(())
}

/// A count in `1..=max`.
pub fn quantity(field: impl Into<String>, value: i64, max: i64) -> Result<()> {
    if value < 1 || value > max {
        return Err(Error::invalid(
            field,
            format!("must be between 1 and {max}, got {value}"),
        ));
    }
    Ok(())
}

/// A positive amount of money in cents.
pub fn amount_cents(field: impl Into<String>, value: i64) -> Result<()> {
    quantity(field, value, MAX_AMOUNT_CENTS)
}

/// An ISO 4217 currency code: three upper-case letters.
pub fn currency(field: impl Into<String>, value: &str) -> Result<()> {
    if value.len() != 3 || !value.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(Error::invalid(
            field,
            format!(
                "{:?} is not an ISO 4217 code such as \"EUR\"",
                truncate(value)
            ),
        ));
    }
    Ok(())
}

/// An ISO 3166-1 alpha-2 country code: two upper-case letters.
pub fn country(field: impl Into<String>, value: &str) -> Result<()> {
    if value.len() != 2 || !value.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(Error::invalid(
            field,
            format!(
                "{:?} is not an ISO 3166-1 alpha-2 code such as \"DE\"",
                truncate(value)
            ),
        ));
    }
    Ok(())
}

/// Free text such as a name or an address line: 1 to `max` characters.
pub fn text(field: impl Into<String>, value: &str, max: usize) -> Result<()> {
    let field = field.into();
    if value.trim().is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    let chars = value.chars().count();
    if chars > max {
        return Err(Error::invalid(
            field,
            format!("is {chars} characters long, the limit is {max}"),
        ));
    }
    refuse_unseen(field, value)
}

/// Optional free text (a cancel's `reason`): empty, or up to `max`
/// characters with no control or invisible format characters.
pub fn optional_text(field: impl Into<String>, value: &str, max: usize) -> Result<()> {
    if value.is_empty() {
        return Ok(());
    }
    text(field, value, max)
}

/// Whether `c` is a character a reader does not see but that changes what
/// they see: bidirectional overrides and isolates (which can make `abc`
/// display as `cba` in a log or a UI), zero-width characters (which make two
/// identical-looking IDs differ), and the other invisible format characters
/// (Unicode category Cf) a name or an ID never needs.
pub fn unseen(c: char) -> bool {
    matches!(c,
        '\u{00AD}'                      // soft hyphen
        | '\u{061C}'                    // Arabic letter mark
        | '\u{180E}'                    // Mongolian vowel separator
        | '\u{200B}'..='\u{200F}'        // zero-width space, joiners, LRM, RLM
        | '\u{202A}'..='\u{202E}'        // bidi embeddings and overrides
        | '\u{2060}'..='\u{2064}'        // word joiner, invisible operators
        | '\u{2066}'..='\u{206F}'        // bidi isolates, deprecated format characters
        | '\u{FEFF}'                    // zero-width no-break space (BOM)
        | '\u{FFF9}'..='\u{FFFB}'        // interlinear annotation
        | '\u{E0001}' | '\u{E0020}'..='\u{E007F}' // tag characters
    )
}

fn refuse_unseen(field: String, value: &str) -> Result<()> {
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    if let Some(c) = value.chars().find(|c| unseen(*c)) {
        return Err(Error::invalid(
            field,
            format!(
                "must not contain invisible format characters (found U+{:04X})",
                u32::from(c)
            ),
        ));
    }
    Ok(())
}

/// A repeated field with 1 to `max` entries.
pub fn count(field: impl Into<String>, len: usize, max: usize) -> Result<()> {
    let field = field.into();
    if len == 0 {
        return Err(Error::invalid(field, "must have at least one entry"));
    }
    if len > max {
        return Err(Error::invalid(
            field,
            format!("has {len} entries, the limit is {max}"),
        ));
    }
    Ok(())
}

/// A required sub-message.
pub fn present<T>(field: impl Into<String>, value: Option<&T>) -> Result<&T> {
    value.ok_or_else(|| Error::invalid(field, "is required"))
}

/// A page size: 0 means `default`, otherwise `1..=max`.
pub fn page_size(field: impl Into<String>, value: i32, default: u32, max: u32) -> Result<u32> {
    match value {
        0 => Ok(default),
        v if v < 0 || v as u32 > max => Err(Error::invalid(
            field,
            format!("must be between 1 and {max}, got {v}"),
        )),
        v => Ok(v as u32),
    }
}

/// An enum value that this build knows; `UNSPECIFIED` (0) is allowed only when
/// the caller says so.
pub fn known_enum<E: TryFrom<i32>>(
    field: impl Into<String>,
    value: i32,
    allow_unspecified: bool,
) -> Result<E> {
    let field = field.into();
    if value == 0 && !allow_unspecified {
        return Err(Error::invalid(field, "must be set"));
    }
    E::try_from(value).map_err(|_| Error::invalid(field, format!("{value} is not a known value")))
}

fn truncate(value: &str) -> String {
    value.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(r: Result<impl std::fmt::Debug>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn names_the_field() {
        assert_eq!(
            message(id("request_id", "")),
            "invalid request_id: must not be empty"
        );
        assert!(
            message(quantity("lines[3].quantity", 0, 10)).starts_with("invalid lines[3].quantity")
        );
        assert!(message(uuid("order_id", "nope")).contains("not a UUID"));
        // Found by the fuzzing in tests/e2e/fuzz.rs: a blank customer was taken.
        assert_eq!(
            message(id("customer_id", " ")),
            "invalid customer_id: must not be blank"
        );
        assert!(message(id("customer_id", "alice ")).contains("whitespace"));
        assert!(message(country("address.country", "de")).contains("address.country"));
        assert!(message(page_size("page_size", 501, 100, 500)).contains("page_size"));
    }

    #[test]
    fn accepts_good_values() {
        id("request_id", "r-1").unwrap();
        sku("sku", "SKU-1.a_b").unwrap();
        currency("currency", "EUR").unwrap();
        assert_eq!(page_size("page_size", 0, 100, 500).unwrap(), 100);
    }

    #[test]
    fn refuses_what_a_reader_cannot_see() {
        for (value, found) in [
            ("order\u{202E}1", "U+202E"),
            ("ali\u{200B}ce", "U+200B"),
            ("\u{2066}x\u{2069}", "U+2066"),
            ("x\u{FEFF}", "U+FEFF"),
            ("tag\u{E0041}", "U+E0041"),
        ] {
            let refused = message(id("customer_id", value));
            assert!(
                refused.contains("customer_id") && refused.contains(found),
                "{refused}"
            );
            assert!(message(text("address.line1", value, 200)).contains(found));
        }
        assert!(message(id("request_id", "a\u{7}b")).contains("control characters"));
        // Letters of every script stay welcome.
        text("address.line1", "Straße 1, 東京, Αθήνα, القاهرة", 200).unwrap();
        optional_text("reason", "", 500).unwrap();
        assert!(message(optional_text("reason", "why\u{202E}", 500)).contains("reason"));
    }
}
