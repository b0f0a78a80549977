//! Invocation traces for the simulator, in two formats:
//!
//! - the Azure Functions 2019 per-minute format (`HashFunction,HashApp,HashOwner,
//!   minute_1,…,minute_N`): one row per target, the count of events in each minute; a
//!   minute with events is one arrival at the minute's start;
//! - a plain CSV of `target,unix_seconds` lines (fractions allowed; an optional header
//!   `target,unix_seconds`): one arrival per line, at its own time.
//!
//! Owns: reading a trace into arrivals per target. A line that does not parse is an
//! error naming the line.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// One target's arrivals, as offsets from the trace's start, in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    /// The target's name in the trace.
    pub name: String,
    /// When its events came.
    pub arrivals: Vec<Duration>,
}

/// A whole trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    /// Targets with at least one event.
    pub targets: Vec<Target>,
    /// The trace's length: nothing runs past it.
    pub horizon: Duration,
}

/// Why a trace could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be read.
    #[error("cannot read trace {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line does not parse.
    #[error("trace line {line}: {message}")]
    Line {
        /// The line number, from 1.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// No events at all.
    #[error("the trace holds no events")]
    Empty,
}

const MINUTE: Duration = Duration::from_secs(60);

/// Reads a trace file of either format.
pub fn read(path: &Path) -> Result<Trace, TraceError> {
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text)
}

/// Reads a trace text of either format, told apart by its first line.
pub fn parse(text: &str) -> Result<Trace, TraceError> {
    let first = text.lines().next().unwrap_or_default();
    let trace = if first.starts_with("HashFunction,") {
        parse_azure(text)?
    } else {
        parse_plain(text)?
    };
    if trace.targets.is_empty() {
        return Err(TraceError::Empty);
    }
    Ok(trace)
}

fn line_error(line: usize, message: impl Into<String>) -> TraceError {
    TraceError::Line {
        line,
        message: message.into(),
    }
}

fn parse_azure(text: &str) -> Result<Trace, TraceError> {
    let mut lines = text.lines().enumerate();
    let (_, header) = lines.next().expect("a first line");
    let minutes = header.split(',').count().saturating_sub(3);
    let expected = |i: usize| format!("minute_{i}");
    for (i, column) in header.split(',').skip(3).enumerate() {
        if column.trim() != expected(i + 1) {
            return Err(line_error(
                1,
                format!("column {} is {column:?}, expected {:?}", i + 4, expected(i + 1)),
            ));
        }
    }
    if minutes == 0 {
        return Err(line_error(1, "no minute_N columns"));
    }
    let mut targets = Vec::new();
    for (index, line) in lines {
        let number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != minutes + 3 {
            return Err(line_error(
                number,
                format!("{} fields, the header has {}", fields.len(), minutes + 3),
            ));
        }
        let mut arrivals = Vec::new();
        for (minute, count) in fields[3..].iter().enumerate() {
            let count: u64 = count
                .trim()
                .parse()
                .map_err(|_| line_error(number, format!("minute_{} is {count:?}, not a count", minute + 1)))?;
            if count > 0 {
                arrivals.push(MINUTE * minute as u32);
            }
        }
        if !arrivals.is_empty() {
            targets.push(Target {
                name: fields[0].to_string(),
                arrivals,
            });
        }
    }
    Ok(Trace {
        targets,
        horizon: MINUTE * minutes as u32,
    })
}

fn parse_plain(text: &str) -> Result<Trace, TraceError> {
    let mut events: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || (number == 1 && line == "target,unix_seconds") {
            continue;
        }
        let (target, seconds) = line
            .split_once(',')
            .ok_or_else(|| line_error(number, "expected target,unix_seconds"))?;
        let seconds: f64 = seconds
            .trim()
            .parse()
            .ok()
            .filter(|s: &f64| s.is_finite() && *s >= 0.0)
            .ok_or_else(|| line_error(number, format!("{seconds:?} is not a time in Unix seconds")))?;
        if target.trim().is_empty() {
            return Err(line_error(number, "the target is empty"));
        }
        events.entry(target.trim().to_string()).or_default().push(seconds);
    }
    // The trace starts at the minute of its first event and ends with its last one's.
    let all = events.values().flatten();
    let start = all.clone().fold(f64::INFINITY, |a, b| a.min(*b));
    let end = all.fold(0.0f64, |a, b| a.max(*b));
    let start = (start / 60.0).floor() * 60.0;
    let targets = events
        .into_iter()
        .map(|(name, mut times)| {
            times.sort_by(f64::total_cmp);
            let arrivals = times.into_iter().map(|t| Duration::from_secs_f64(t - start)).collect();
            Target { name, arrivals }
        })
        .collect();
    let horizon = if start.is_finite() {
        Duration::from_secs_f64(((end - start) / 60.0).floor() * 60.0 + 60.0)
    } else {
        Duration::ZERO
    };
    Ok(Trace { targets, horizon })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_azure_format_is_one_arrival_per_minute_with_events() {
        let trace = parse(
            "HashFunction,HashApp,HashOwner,minute_1,minute_2,minute_3\n\
             f1,a,o,0,3,1\n\
             f2,a,o,0,0,0\n\
             f3,a,o,7,0,0\n",
        )
        .unwrap();
        assert_eq!(trace.horizon, MINUTE * 3);
        assert_eq!(trace.targets.len(), 2, "a row without events is no target");
        assert_eq!(trace.targets[0].arrivals, vec![MINUTE, MINUTE * 2]);
        assert_eq!(trace.targets[1].name, "f3");
    }

    #[test]
    fn the_plain_format_keeps_each_event_s_time() {
        let trace = parse("target,unix_seconds\nb,1000.5\na,1030\na,1000\n").unwrap();
        assert_eq!(trace.targets[0].name, "a");
        assert_eq!(
            trace.targets[0].arrivals,
            vec![Duration::from_secs(40), Duration::from_secs(70)]
        );
        assert_eq!(trace.targets[1].arrivals, vec![Duration::from_secs_f64(40.5)]);
        assert_eq!(
            trace.horizon,
            MINUTE * 2,
            "from the first event's minute to the last's end"
        );
    }

    #[test]
    fn a_line_that_does_not_parse_is_named() {
        let cases = [
            ("HashFunction,HashApp,HashOwner,minute_1\nf,a,o,x\n", "line 2"),
            (
                "HashFunction,HashApp,HashOwner,minute_1\nf,a,o,1,2\n",
                "line 2: 5 fields",
            ),
            ("HashFunction,HashApp,HashOwner,minute_2\n", "line 1"),
            ("a,1\nb,yesterday\n", "line 2"),
            ("a 1\n", "line 1"),
            (",5\n", "line 1"),
            ("a,-4\n", "line 1"),
        ];
        for (text, expected) in cases {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
        assert!(matches!(parse("target,unix_seconds\n"), Err(TraceError::Empty)));
    }
}
