//! Keep-warm schedules: when a VM must be running whatever its traffic, e.g.
//! `Mon-Fri 08:00-18:00 Europe/Berlin`; several windows joined by `;`.
//!
//! One window is `[DAYS] HH:MM-HH:MM [ZONE]`:
//! - DAYS: English three-letter day names, single or as ranges, joined by `,`
//!   (`Mon-Fri`, `Sat,Sun`, `Mon,Wed-Fri`, `Fri-Mon`), or `daily`; none means every day;
//! - the window runs from the first time to the second on each listed day; a second
//!   time at or before the first ends it the next day (`22:00-02:00`), `24:00` is the end
//!   of the day;
//! - ZONE: an IANA time zone (`Europe/Berlin`; the tz database is built in), default
//!   `UTC`. Times are the zone's wall clock, daylight saving included.
//!
//! Owns: parsing and the two questions the owner asks — until when is `now` inside a
//! window, and when does the next one begin. Pure: the time is an argument, so tests
//! drive it with a paused clock.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use jiff::civil::{Date, Time};
use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};

/// A keep-warm schedule: one or more windows.
#[derive(Clone)]
pub struct Schedule {
    text: String,
    windows: Vec<Window>,
}

#[derive(Clone)]
struct Window {
    /// Monday first.
    days: [bool; 7],
    start: Time,
    /// `None` for 24:00.
    end: Option<Time>,
    zone: TimeZone,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl FromStr for Schedule {
    type Err = String;

    fn from_str(text: &str) -> Result<Schedule, String> {
        let windows = text
            .split(';')
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .map(|w| Window::parse(w).map_err(|e| format!("keep-warm window {w:?}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if windows.is_empty() {
            return Err(
                "a keep-warm schedule needs at least one window, e.g. \"Mon-Fri 08:00-18:00 Europe/Berlin\"".into(),
            );
        }
        Ok(Schedule {
            text: text.trim().to_string(),
            windows,
        })
    }
}

impl Window {
    fn parse(text: &str) -> Result<Window, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let range_at = words
            .iter()
            .position(|w| w.contains(':') && w.contains('-'))
            .ok_or("no time range (HH:MM-HH:MM)")?;
        let days = match &words[..range_at] {
            [] => [true; 7],
            [days] => parse_days(days)?,
            _ => return Err("days are one word, e.g. Mon-Fri or Mon,Wed".into()),
        };
        let (start, end) = words[range_at].split_once('-').ok_or("no time range")?;
        let start = parse_time(start)?.ok_or("a window cannot start at 24:00")?;
        let end = parse_time(end)?;
        let zone = match &words[range_at + 1..] {
            [] => TimeZone::UTC,
            [zone] => TimeZone::get(zone).map_err(|e| format!("unknown time zone {zone:?}: {e}"))?,
            _ => return Err("one time zone after the time range".into()),
        };
        Ok(Window { days, start, end, zone })
    }

    /// This window's occurrence that begins on `date`, if `date` is one of its days.
    fn on(&self, date: Date) -> Option<(Timestamp, Timestamp)> {
        let weekday = date.weekday().to_monday_zero_offset() as usize;
        if !self.days[weekday] {
            return None;
        }
        let start = date.to_datetime(self.start).to_zoned(self.zone.clone()).ok()?;
        let end_date = match self.end {
            Some(end) if end > self.start => date,
            _ => date.tomorrow().ok()?,
        };
        let end = end_date
            .to_datetime(self.end.unwrap_or(Time::midnight()))
            .to_zoned(self.zone.clone())
            .ok()?;
        Some((start.timestamp(), end.timestamp()))
    }

    /// The local date of `now` in this window's zone.
    fn today(&self, now: Timestamp) -> Date {
        Zoned::new(now, self.zone.clone()).date()
    }
}

fn parse_days(text: &str) -> Result<[bool; 7], String> {
    if text.eq_ignore_ascii_case("daily") {
        return Ok([true; 7]);
    }
    let day = |name: &str| {
        DAYS.iter()
            .position(|d| d.eq_ignore_ascii_case(name))
            .ok_or_else(|| format!("unknown day {name:?} (Mon, Tue, Wed, Thu, Fri, Sat, Sun)"))
    };
    let mut days = [false; 7];
    for part in text.split(',') {
        match part.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (day(from)?, day(to)?);
                let mut d = from;
                loop {
                    days[d] = true;
                    if d == to {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days[day(part)?] = true,
        }
    }
    Ok(days)
}

/// `HH:MM`; `None` for `24:00`.
fn parse_time(text: &str) -> Result<Option<Time>, String> {
    let bad = || format!("{text:?} is not a time (HH:MM)");
    let (hour, minute) = text.split_once(':').ok_or_else(bad)?;
    let (hour, minute): (i8, i8) = (hour.parse().map_err(|_| bad())?, minute.parse().map_err(|_| bad())?);
    if hour == 24 && minute == 0 {
        return Ok(None);
    }
    Time::new(hour, minute, 0, 0).map(Some).map_err(|_| bad())
}

impl Schedule {
    /// When the window `now` is in ends, if it is in one (windows that overlap or touch
    /// count as one).
    pub fn inside(&self, now: SystemTime) -> Option<SystemTime> {
        let now = Timestamp::try_from(now).ok()?;
        let mut end: Option<Timestamp> = None;
        let mut at = now;
        // Follow touching windows to the end of the chain (bounded: a week of windows).
        for _ in 0..(self.windows.len() * 8) {
            let Some(next) = self.containing(at) else {
                break;
            };
            if end.is_some_and(|e| next <= e) {
                break;
            }
            end = Some(next);
            at = next;
        }
        end.map(SystemTime::from)
    }

    /// The latest end of the windows that contain `at`.
    fn containing(&self, at: Timestamp) -> Option<Timestamp> {
        self.windows
            .iter()
            .flat_map(|w| {
                let today = w.today(at);
                [today.yesterday().ok(), Some(today)]
                    .into_iter()
                    .flatten()
                    .filter_map(|date| w.on(date))
            })
            .filter(|(start, end)| *start <= at && at < *end)
            .map(|(_, end)| end)
            .max()
    }

    /// When the next window begins after `now` (strictly).
    pub fn next_start(&self, now: SystemTime) -> Option<SystemTime> {
        let now = Timestamp::try_from(now).ok()?;
        self.windows
            .iter()
            .flat_map(|w| {
                let today = w.today(now);
                (0..=8).filter_map(move |days| {
                    let date = today.checked_add(jiff::Span::new().days(days)).ok()?;
                    w.on(date)
                })
            })
            .map(|(start, _)| start)
            .filter(|start| *start > now)
            .min()
            .map(SystemTime::from)
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({:?})", self.text)
    }
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Schedule) -> bool {
        self.text == other.text
    }
}

impl Eq for Schedule {}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wall-clock instant written in `zone`.
    fn at(text: &str, zone: &str) -> SystemTime {
        let civil: jiff::civil::DateTime = text.parse().unwrap();
        SystemTime::from(civil.to_zoned(TimeZone::get(zone).unwrap()).unwrap().timestamp())
    }

    #[test]
    fn office_hours_in_berlin() {
        let s: Schedule = "Mon-Fri 08:00-18:00 Europe/Berlin".parse().unwrap();
        // Tuesday 2026-12-01, 10:00 in Berlin (09:00 UTC): inside until 18:00.
        assert_eq!(
            s.inside(at("2026-12-01T10:00", "Europe/Berlin")),
            Some(at("2026-12-01T18:00", "Europe/Berlin"))
        );
        assert_eq!(s.inside(at("2026-12-01T07:59", "Europe/Berlin")), None);
        assert_eq!(s.inside(at("2026-12-01T18:00", "Europe/Berlin")), None);
        // Friday evening → Monday morning.
        assert_eq!(
            s.next_start(at("2026-12-04T18:30", "Europe/Berlin")),
            Some(at("2026-12-07T08:00", "Europe/Berlin"))
        );
        assert_eq!(s.inside(at("2026-12-05T12:00", "Europe/Berlin")), None, "Saturday");
    }

    #[test]
    fn daylight_saving_keeps_the_wall_clock() {
        let s: Schedule = "daily 08:00-09:00 Europe/Berlin".parse().unwrap();
        // 2026-03-29 is the spring change in Berlin: 08:00 is then 06:00 UTC, not 07:00.
        assert_eq!(
            s.next_start(at("2026-03-28T12:00", "UTC")),
            Some(at("2026-03-29T06:00", "UTC"))
        );
    }

    #[test]
    fn windows_over_midnight_and_touching_windows() {
        let s: Schedule = "Fri 22:00-02:00".parse().unwrap();
        // Saturday 01:00 UTC is inside Friday's window.
        assert_eq!(
            s.inside(at("2026-12-05T01:00", "UTC")),
            Some(at("2026-12-05T02:00", "UTC"))
        );
        let s: Schedule = "daily 08:00-12:00; daily 12:00-24:00".parse().unwrap();
        assert_eq!(
            s.inside(at("2026-12-01T09:00", "UTC")),
            Some(at("2026-12-02T00:00", "UTC")),
            "touching windows are one"
        );
        let s: Schedule = "Fri-Mon 00:00-24:00".parse().unwrap();
        assert!(
            s.inside(at("2026-12-06T12:00", "UTC")).is_some(),
            "Sunday, in a wrapping range"
        );
        assert!(s.inside(at("2026-12-02T12:00", "UTC")).is_none(), "Wednesday");
    }

    #[test]
    fn bad_schedules_say_what_is_wrong() {
        for (text, says) in [
            ("", "at least one window"),
            ("Mon-Fri", "no time range"),
            ("Mon-Fry 08:00-18:00", "unknown day"),
            ("Mon 25:00-26:00", "not a time"),
            ("Mon 08:00-18:00 Mars/Olympus", "unknown time zone"),
            ("Mon 24:00-02:00", "cannot start at 24:00"),
        ] {
            let error = text.parse::<Schedule>().unwrap_err();
            assert!(error.contains(says), "{text:?}: {error}");
        }
    }
}
