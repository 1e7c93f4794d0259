//! A parsed TOML file that remembers where each value came from, so every
//! configuration error can name the file and line.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml_edit::{Item, TableLike, Value};

/// One problem in one configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {message}", path.display(), at_line(*line))]
pub struct ConfigError {
    pub path: PathBuf,
    /// 1-based; 0 when the problem concerns the file as a whole.
    pub line: usize,
    pub message: String,
}

/// `:LINE`, or nothing when the problem is the file as a whole.
fn at_line(line: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(":{line}")
    }
}

/// Every problem found in a configuration, reported together so an
/// operator fixes them in one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

/// The text of a configuration file and its parsed document.
pub struct Source {
    pub path: PathBuf,
    text: String,
    pub doc: toml_edit::Document<String>,
}

impl Source {
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = read_config_file(path).map_err(|message| ConfigError {
            path: path.to_path_buf(),
            line: 0,
            message,
        })?;
        Self::parse(path, text)
    }

    pub fn parse(path: &Path, text: String) -> Result<Self, ConfigError> {
        match toml_edit::Document::parse(text.clone()) {
            Ok(doc) => Ok(Source {
                path: path.to_path_buf(),
                text,
                doc,
            }),
            Err(e) => {
                let line = e.span().map_or(0, |s| line_of(&text, s.start));
                Err(ConfigError {
                    path: path.to_path_buf(),
                    line,
                    message: format!("TOML syntax error: {}", e.message().trim()),
                })
            }
        }
    }

    /// The 1-based line where `span` starts, or 0 when unknown.
    pub fn line(&self, span: Option<Range<usize>>) -> usize {
        span.map_or(0, |s| line_of(&self.text, s.start))
    }

    pub fn error(&self, span: Option<Range<usize>>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            path: self.path.clone(),
            line: self.line(span),
            message: message.into(),
        }
    }

    /// `path:line` of `span`, for log lines about where an endpoint came from.
    pub fn origin(&self, span: Option<Range<usize>>) -> String {
        format!("{}:{}", self.path.display(), self.line(span))
    }
}

/// Configuration files are at most this big.
pub const MAX_CONFIG_FILE: u64 = 1 << 20;

/// The text of a configuration file: a regular file (opened without
/// blocking, so a FIFO or a device put in its place cannot hang the
/// reader) of at most [`MAX_CONFIG_FILE`] bytes, in UTF-8. `/dev/null`
/// is an empty file (`--config /dev/null`: no settings).
pub fn read_config_file(path: &Path) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    if path == Path::new("/dev/null") {
        return Ok(String::new());
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot read: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > MAX_CONFIG_FILE {
        return Err(format!(
            "{} bytes: configuration files are at most {MAX_CONFIG_FILE} bytes",
            meta.len()
        ));
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_CONFIG_FILE {
        return Err(format!(
            "configuration files are at most {MAX_CONFIG_FILE} bytes"
        ));
    }
    String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The span of an item, or of its key when the item has none (tables).
pub fn span_of(table: &dyn TableLike, key: &str) -> Option<Range<usize>> {
    let (k, item) = table.get_key_value(key)?;
    item.span().or_else(|| k.span())
}

/// Typed reads of one value, with errors that name file and line.
pub struct Field<'a> {
    pub src: &'a Source,
    pub key: &'a str,
    pub item: &'a Item,
    pub span: Option<Range<usize>>,
}

impl<'a> Field<'a> {
    /// The error for a key the visitor does not know: the `match` on the
    /// key is the only list of keys, and this is its last arm.
    pub fn unknown(&self) -> ConfigErrors {
        self.src
            .error(self.span.clone(), format!("unknown key `{}`", self.key))
            .into()
    }

    fn wrong(&self, want: &str) -> ConfigError {
        self.src
            .error(self.span.clone(), format!("`{}` must be {want}", self.key))
    }

    pub fn str(&self) -> Result<&'a str, ConfigError> {
        self.item.as_str().ok_or_else(|| self.wrong("a string"))
    }

    pub fn bool(&self) -> Result<bool, ConfigError> {
        self.item
            .as_bool()
            .ok_or_else(|| self.wrong("true or false"))
    }

    /// A string, or an array of strings.
    pub fn strings(&self) -> Result<Vec<&'a str>, ConfigError> {
        match self.item.as_value() {
            Some(Value::String(s)) => Ok(vec![s.value().as_str()]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| self.wrong("a string or an array of strings"))
                })
                .collect(),
            _ => Err(self.wrong("a string or an array of strings")),
        }
    }

    /// A size: bytes as an integer, or a string such as `"20GiB"`.
    pub fn size(&self) -> Result<u64, ConfigError> {
        let want = "a size: bytes as an integer, or a string like \"512MiB\", \"20GiB\"";
        if let Some(n) = self.item.as_integer() {
            return u64::try_from(n).map_err(|_| self.wrong(want));
        }
        let s = self.item.as_str().ok_or_else(|| self.wrong(want))?;
        parse_size(s).ok_or_else(|| self.wrong(want))
    }

    /// A whole number from `min` to `max`.
    pub fn count(&self, min: usize, max: usize) -> Result<usize, ConfigError> {
        self.item
            .as_integer()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| self.wrong(&format!("a whole number from {min} to {max}")))
    }

    /// Visits this value as a table (`[upstream]`, say), returning every
    /// problem found in it.
    pub fn section(
        &self,
        visit: impl FnMut(Field<'a>) -> Result<(), ConfigErrors>,
    ) -> Result<(), ConfigErrors> {
        let table = self.item.as_table_like().ok_or_else(|| {
            self.src
                .error(self.span.clone(), format!("`{}` must be a table", self.key))
        })?;
        let mut errors = Vec::new();
        visit_table(self.src, table, &mut errors, visit);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// A duration: whole seconds as an integer, or a string such as
    /// `"500ms"`, `"5s"`, `"2m"`.
    ///
    /// At most [`MAX_DURATION`]: every duration of the configuration ends
    /// up added to a clock reading somewhere, and none is meant to last
    /// longer than a year.
    pub fn duration(&self) -> Result<Duration, ConfigError> {
        let want = "a duration: seconds as an integer, or a string like \"500ms\", \"5s\", \"2m\"";
        let d = if let Some(n) = self.item.as_integer() {
            u64::try_from(n)
                .map(Duration::from_secs)
                .map_err(|_| self.wrong(want))?
        } else {
            let s = self.item.as_str().ok_or_else(|| self.wrong(want))?;
            parse_duration(s).ok_or_else(|| self.wrong(want))?
        };
        if d > MAX_DURATION {
            return Err(self.wrong("at most 8784h (366 days)"));
        }
        Ok(d)
    }

    /// A duration of at least `min` (a zero that would make no sense).
    pub fn duration_from(&self, min: Duration) -> Result<Duration, ConfigError> {
        let d = self.duration()?;
        if d < min {
            return Err(self.wrong(&format!("at least {min:?}")));
        }
        Ok(d)
    }
}

/// The longest duration any setting may have.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// Parses a size: bytes as an integer or a string like `"512MiB"`, `"20GiB"`,
/// `"1.5TB"` (`K`/`KiB`… are binary, `KB`… decimal).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "K" | "KiB" => 1024.0,
        "M" | "MiB" => 1024.0 * 1024.0,
        "G" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        "T" | "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        _ => return None,
    };
    let v = n * mult;
    (v.is_finite() && v >= 0.0 && v < u64::MAX as f64).then_some(v as u64)
}

/// Parses `"250ms"`, `"5s"`, `"2m"`, `"1h"` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit.trim() {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

/// Walks the keys of a table, handing each to `visit`, which answers
/// [`Field::unknown`] for a key it does not know, so a typo never silently
/// changes behaviour. Every problem `visit` returns is kept (a nested table
/// may have several).
pub fn visit_table<'a>(
    src: &'a Source,
    table: &'a dyn TableLike,
    errors: &mut Vec<ConfigError>,
    mut visit: impl FnMut(Field<'a>) -> Result<(), ConfigErrors>,
) {
    for (key, item) in table.iter() {
        let span = span_of(table, key);
        if let Err(e) = visit(Field {
            src,
            key,
            item,
            span,
        }) {
            errors.extend(e.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("5 s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("5d"), None);
        assert_eq!(parse_duration("-5s"), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("2KiB"), Some(2048));
        assert_eq!(parse_size("1.5 GiB"), Some(1610612736));
        assert_eq!(parse_size("20GB"), Some(20_000_000_000));
        assert_eq!(parse_size("5 parsecs"), None);
        assert_eq!(parse_size("-1"), None);
    }

    #[test]
    fn only_small_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.toml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = Source::read(&fifo).err().unwrap();
        assert_eq!(e.line, 0);
        assert!(
            e.to_string().ends_with("fifo.toml: not a regular file"),
            "{e}"
        );
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; (MAX_CONFIG_FILE + 1) as usize]).unwrap();
        let e = Source::read(&big).err().unwrap();
        assert!(e.to_string().contains("at most"), "{e}");
        assert!(Source::read(dir.path()).is_err(), "a folder");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = Source::parse(Path::new("x.toml"), "a = 1\nb = \n".into())
            .err()
            .unwrap();
        assert_eq!(e.line, 2, "{e}");
        assert!(
            e.to_string().starts_with("x.toml:2: TOML syntax error"),
            "{e}"
        );
    }
}
