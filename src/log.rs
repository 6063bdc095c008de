//! The server's log: lines on stderr (journald takes them from there), as
//! text for people (`ringnbd: ...`, the default) or one JSON object per
//! line (`--log-format json`) for log pipelines.
//!
//! Two kinds of line: [`note!`] for a message alone, and [`event`] for
//! the lines that carry facts a pipeline wants as fields (a connection
//! opening and closing, a refused option, an error reply): in text they
//! are the message, in JSON the message plus the fields.

use std::io::Write;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Text,
    Json,
}

static FORMAT: OnceLock<Format> = OnceLock::new();

/// Sets the format, once, before the server's threads start.
pub fn init(format: Format) {
    let _ = FORMAT.set(format);
}

fn format() -> Format {
    FORMAT.get().copied().unwrap_or_default()
}

/// A line with just a message: `ringnbd: MESSAGE`, or in JSON
/// `{"time":..,"level":"info","message":..}`.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {
        $crate::log::message(&format!($($arg)*))
    };
}

/// Writes a message line (see [`note!`]).
pub fn message(text: &str) {
    event("message", &[], text);
}

/// Writes one line: `ringnbd: MESSAGE` in text; in JSON an object with
/// the time, the event name, the message and `fields`.
pub fn event(name: &str, fields: &[(&str, Value)], message: &str) {
    let line = match format() {
        Format::Text => format!("ringnbd: {message}\n"),
        Format::Json => {
            // Written by hand to keep a fixed order: time, event, the
            // fields as given, then the message.
            let quote = |text: &str| Value::String(text.to_owned()).to_string();
            let mut line = format!("{{\"time\":{},\"event\":{}", quote(&utc_now()), quote(name));
            for (key, value) in fields {
                line += &format!(",{}:{value}", quote(key));
            }
            line += &format!(",\"message\":{}}}\n", quote(message));
            line
        }
    };
    // One write per line, so lines from different threads never mix.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Now as RFC 3339 UTC with milliseconds, e.g. `2026-12-04T20:31:05.123Z`.
fn utc_now() -> String {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    rfc3339(since.as_secs() as i64, since.subsec_millis())
}

fn rfc3339(seconds: i64, millis: u32) -> String {
    let (days, of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    let (h, m, s) = (of_day / 3600, of_day % 3600 / 60, of_day % 60);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{millis:03}Z")
}

/// The proleptic Gregorian date of a day count from 1970-01-01 (the
/// well-known era-based conversion: 400-year eras of 146,097 days).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z", "a leap day");
        assert_eq!(rfc3339(1_796_416_265, 999), "2026-12-04T20:31:05.999Z");
        assert_eq!(rfc3339(4_107_542_399, 0), "2100-02-28T23:59:59.000Z", "2100 is not a leap year");
        assert_eq!(rfc3339(-1, 0), "1969-12-31T23:59:59.000Z");
    }
}
