//! Logging set-up: text or JSON lines on stderr, each with its syslog
//! priority in front when stderr is the journal; `RUST_LOG`, when set, wins
//! over `log.level`.
//!
//! Lines go to stderr from a thread of their own, through a queue of
//! [`QUEUED_LINES`]: a log reader that stops reading (a stalled journald,
//! docker's blocking log driver on a full disk, a stopped pipeline) fills
//! the pipe, and a proxy that wrote its lines itself would stop in the
//! middle of a connection, every other connection and its health endpoints
//! with it. Lines that find the queue full are dropped and counted instead.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::{Event, Level, Subscriber};
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, MakeWriter};
use tracing_subscriber::layer::Context;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::{LogConfig, LogFormat};

/// Lines waiting for the log reader: seconds of one line per connection at
/// a busy sidecar's rate, a quarter of a second at 16,000 connections a
/// second; the queue's slots, 32 bytes each, are taken at start.
pub const QUEUED_LINES: usize = 4096;

/// How long the exit waits for queued lines to be written.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(2);

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Told when a line is dropped, so that the reporter sleeps until then: a
/// ticking reporter woke an idle proxy every second for nothing.
static DROP_NOTICED: Notify = Notify::const_new();

/// Set by `init` when `log.level` governs the filter; unset when
/// `RUST_LOG` does (it wins, so a reload leaves it) or nothing is
/// installed (unit tests).
static SET_FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Lines are JSON (`log.format = "json"`), else text: read by [`Switch`]
/// for each event, so that a reload can switch between them.
static JSON: AtomicBool = AtomicBool::new(false);

/// What a reload did with `log.level`.
#[derive(Debug, PartialEq, Eq)]
pub enum LevelChange {
    Applied,
    /// `RUST_LOG` is set: it wins over the file, at start and at reload.
    EnvWins,
}

/// Applies a new `log.level` (validated when the configuration was
/// loaded), so that a reload can turn on `debug` without a restart, which
/// would drain every open connection.
pub fn set_level(level: &str) -> Result<LevelChange, String> {
    let Some(set) = SET_FILTER.get() else {
        return Ok(LevelChange::EnvWins);
    };
    let filter = EnvFilter::try_new(level).map_err(|e| format!("log.level {level:?}: {e}"))?;
    set.reload(filter).map_err(|e| e.to_string())?;
    Ok(LevelChange::Applied)
}

/// Applies a new `log.format` to the lines that follow.
pub fn set_format(format: LogFormat) {
    JSON.store(format == LogFormat::Json, Ordering::Relaxed);
}

/// Log lines dropped so far because the log reader did not keep up.
pub fn dropped_lines() -> u64 {
    DROPPED
        .get()
        .map_or(0, |c| u64::try_from(c.dropped_lines()).unwrap_or(u64::MAX))
}

/// Keeps the writer thread; dropping it writes out the lines still queued,
/// waiting at most `FLUSH_AT_EXIT` (2 s), so a reader that stopped reading does
/// not hold the exit (the library's own wait gives up after 1.1 s, then
/// prints to stdout, which may be the same stalled pipe).
pub struct LogGuard(Option<WorkerGuard>);

impl Drop for LogGuard {
    fn drop(&mut self) {
        let Some(worker) = self.0.take() else { return };
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let flush = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || {
                drop(worker);
                let _ = done_tx.send(());
            });
        // Without a thread the worker is dropped here, where it may wait.
        if flush.is_ok() {
            let _ = done_rx.recv_timeout(FLUSH_AT_EXIT);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("RUST_LOG={value:?} is not a log filter")]
    BadEnv {
        value: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("cannot install the logger: {0}")]
    Install(String),
}

/// Installs the global subscriber. `rust_log` is the value of `RUST_LOG`,
/// passed in so that the rule "the variable wins" is testable. Keep the
/// guard until the process ends.
pub fn init(cfg: &LogConfig, rust_log: Option<String>) -> Result<LogGuard, LogError> {
    let rust_log = rust_log.filter(|v| !v.is_empty());
    let from_file = rust_log.is_none();
    let filter = match rust_log {
        Some(value) => {
            EnvFilter::try_new(&value).map_err(|source| LogError::BadEnv { value, source })?
        }
        // Validated when the config was loaded.
        None => EnvFilter::try_new(&cfg.level).unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let (writer, worker) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let writer = Noticing {
        inner: writer,
        dropped: dropped.clone(),
    };
    let journal = stderr_is_journal(std::env::var_os("JOURNAL_STREAM"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let format = tracing_subscriber::fmt::format().with_target(false);
    set_format(cfg.format);
    let text = tracing_subscriber::fmt::layer()
        .with_writer(writer.clone())
        .with_ansi(ansi)
        .event_format(Prioritised {
            inner: format.clone(),
            journal,
        });
    let json = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi)
        .fmt_fields(JsonFields::new())
        .event_format(Prioritised {
            inner: format.json().flatten_event(true),
            journal,
        });
    // The level filter sits behind a reload layer: one uncontended read
    // lock per enabled event. Disabled call sites are cached as such by
    // tracing and never reach it, and a reload rebuilds that cache.
    let (filter, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(Switch { text, json })
        .try_init()
        .map_err(|e| LogError::Install(e.to_string()))?;
    if from_file {
        let _ = SET_FILTER.set(handle);
    }
    let _ = DROPPED.set(dropped);
    Ok(LogGuard(Some(worker)))
}

/// The queue's writer, telling [`report_dropped`] when a line it was given
/// was dropped: an atomic load either side of each line.
#[derive(Clone)]
struct Noticing {
    inner: NonBlocking,
    dropped: ErrorCounter,
}

struct NoticingWriter<'a> {
    inner: NonBlocking,
    dropped: &'a ErrorCounter,
}

impl<'a> MakeWriter<'a> for Noticing {
    type Writer = NoticingWriter<'a>;

    fn make_writer(&'a self) -> NoticingWriter<'a> {
        NoticingWriter {
            inner: self.inner.make_writer(),
            dropped: &self.dropped,
        }
    }
}

impl std::io::Write for NoticingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let before = self.dropped.dropped_lines();
        let written = self.inner.write(buf);
        if self.dropped.dropped_lines() != before {
            DROP_NOTICED.notify_one();
        }
        written
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Both line formats, each event written by the one `JSON` selects: an
/// atomic load per event the level filter lets through. Spans go to both,
/// so that each keeps the fields of every open span in its own form and
/// either can write the next event. (Two layers behind per-layer filters
/// would do the same, but those hide the level filter's maximum from
/// tracing, and every disabled `debug!` would then cost a call-site check
/// instead of a level comparison.)
struct Switch<T, J> {
    text: T,
    json: J,
}

impl<S, T, J> Layer<S> for Switch<T, J>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    T: Layer<S>,
    J: Layer<S>,
{
    fn on_layer(&mut self, subscriber: &mut S) {
        self.text.on_layer(subscriber);
        self.json.on_layer(subscriber);
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        self.text.on_new_span(attrs, id, ctx.clone());
        self.json.on_new_span(attrs, id, ctx);
    }

    fn on_record(
        &self,
        span: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        self.text.on_record(span, values, ctx.clone());
        self.json.on_record(span, values, ctx);
    }

    fn on_enter(&self, id: &tracing::span::Id, ctx: Context<'_, S>) {
        self.text.on_enter(id, ctx.clone());
        self.json.on_enter(id, ctx);
    }

    fn on_exit(&self, id: &tracing::span::Id, ctx: Context<'_, S>) {
        self.text.on_exit(id, ctx.clone());
        self.json.on_exit(id, ctx);
    }

    fn on_close(&self, id: tracing::span::Id, ctx: Context<'_, S>) {
        self.text.on_close(id.clone(), ctx.clone());
        self.json.on_close(id, ctx);
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if JSON.load(Ordering::Relaxed) {
            self.json.on_event(event, ctx);
        } else {
            self.text.on_event(event, ctx);
        }
    }
}

/// Starts each line with its syslog priority (`<4>` for WARN) when stderr
/// is the journal, which takes the prefix off as the entry's priority: then
/// `journalctl -p warning -u failover-proxy` shows the warnings, and the
/// journal's own colouring and forwarding by priority work.
struct Prioritised<F> {
    inner: F,
    journal: bool,
}

impl<S, N, F> FormatEvent<S, N> for Prioritised<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        if self.journal {
            let priority = match *event.metadata().level() {
                Level::ERROR => 3,
                Level::WARN => 4,
                Level::INFO => 6,
                _ => 7,
            };
            write!(writer, "<{priority}>")?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}

/// Whether stderr is the journal's stream. systemd names that stream in
/// `JOURNAL_STREAM` as `device:inode`; a process started from such a unit
/// with its stderr sent elsewhere inherits the variable, hence the check.
fn stderr_is_journal(journal_stream: Option<std::ffi::OsString>) -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(named) = journal_stream.and_then(|v| v.into_string().ok()) else {
        return false;
    };
    let Some((dev, ino)) = named.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .and_then(|fd| std::fs::File::from(fd).metadata())
        .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// Logs how many lines were dropped (see `DropReport`; the scrape reads
/// the count for `log_lines_dropped_total`). Asleep until a line is
/// dropped, then ticks each second until every drop has been reported.
pub async fn report_dropped() {
    let mut report = DropReport::default();
    loop {
        DROP_NOTICED.notified().await;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let dropped = dropped_lines();
            if let Some(lines) = report.due(dropped) {
                tracing::warn!(
                    dropped = lines,
                    "log lines dropped: stderr was not read fast enough"
                );
                report.made(dropped, dropped_lines());
            }
            if report.settled() {
                break;
            }
        }
    }
}

/// When to report dropped log lines, one tick at a time: once a tick has
/// passed without a drop, since while the reader is stalled the report
/// would be dropped too. A report that was dropped all the same (the count
/// grew as it was made) is made again later, with the lines since.
#[derive(Debug, Default)]
struct DropReport {
    /// The count the last report that got through covers.
    reported: u64,
    /// The count at the previous tick.
    seen: u64,
}

impl DropReport {
    /// The lines to report at a tick that finds `dropped` dropped in all.
    fn due(&mut self, dropped: u64) -> Option<u64> {
        let due =
            (dropped > self.reported && dropped == self.seen).then(|| dropped - self.reported);
        self.seen = dropped;
        due
    }

    /// A report was made at the count `before`; `after` is the count just
    /// after it.
    fn made(&mut self, before: u64, after: u64) {
        if after == before {
            self.reported = before;
        }
    }

    /// Every line dropped by the last tick has been reported: nothing is
    /// due until another is dropped.
    fn settled(&self) -> bool {
        self.reported == self.seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::notified_now as told;
    use std::io::Write;
    use std::sync::mpsc;

    /// A log reader that stops reading: its first write says so on
    /// `entered`, then waits until `release` is dropped or sent to.
    struct Stalled {
        entered: mpsc::Sender<()>,
        release: mpsc::Receiver<()>,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.entered.send(());
            let _ = self.release.recv();
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_reporter_is_told_of_a_dropped_line_and_only_of_one() {
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let (queue, worker) = NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(1)
            .finish(Stalled {
                entered: entered_tx,
                release: release_rx,
            });
        let writer = Noticing {
            dropped: queue.error_counter(),
            inner: queue,
        };
        let mut told_of = std::pin::pin!(DROP_NOTICED.notified());
        told_of.as_mut().enable();
        // The first line reaches the reader, which stops there.
        writer.make_writer().write_all(b"one\n").unwrap();
        entered.recv().unwrap();
        // The second waits in the queue: not a drop.
        writer.make_writer().write_all(b"two\n").unwrap();
        assert_eq!(writer.dropped.dropped_lines(), 0);
        assert!(!told(told_of.as_mut()), "told with nothing dropped");
        // The third finds the queue full.
        writer.make_writer().write_all(b"three\n").unwrap();
        assert_eq!(writer.dropped.dropped_lines(), 1);
        assert!(told(told_of.as_mut()), "not told of the dropped line");
        drop(release);
        drop(worker);
    }

    #[test]
    fn dropped_lines_are_reported_once_the_drops_stop_and_each_only_once() {
        let mut r = DropReport::default();
        // Nothing dropped: nothing to say, and nothing to wait for.
        assert_eq!(r.due(0), None);
        assert!(r.settled());
        assert_eq!(r.due(0), None);
        // A stall: not while it lasts, then once.
        assert_eq!(r.due(100), None);
        assert!(!r.settled());
        assert_eq!(r.due(300), None);
        assert_eq!(r.due(300), Some(300));
        assert!(!r.settled(), "not settled until the report is made");
        r.made(300, 300);
        assert!(r.settled());
        assert_eq!(r.due(300), None);
        assert_eq!(r.due(300), None);
        // Another: only the lines since.
        assert_eq!(r.due(310), None);
        assert_eq!(r.due(310), Some(10));
        // The report itself was dropped: made again with what came since.
        r.made(310, 311);
        assert!(!r.settled());
        assert_eq!(r.due(311), None);
        assert!(!r.settled());
        assert_eq!(r.due(311), Some(11));
        r.made(311, 311);
        assert!(r.settled());
        assert_eq!(r.due(311), None);
    }

    /// Lines written by the layers under test, shared with the test.
    #[derive(Clone, Default)]
    struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            crate::lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Lines;

        fn make_writer(&'a self) -> Lines {
            self.clone()
        }
    }

    /// No span of the proxy's own exists yet, but a dependency's may (hyper
    /// has them behind a feature): each format keeps a span's fields only if
    /// [`Switch`] passes the span's creation and later records on to it.
    #[test]
    fn both_formats_carry_the_fields_of_the_span_an_event_is_in() {
        let lines = Lines::default();
        let format = tracing_subscriber::fmt::format()
            .with_target(false)
            .without_time();
        let text = tracing_subscriber::fmt::layer()
            .with_writer(lines.clone())
            .with_ansi(false)
            .event_format(format.clone());
        let json = tracing_subscriber::fmt::layer()
            .with_writer(lines.clone())
            .fmt_fields(JsonFields::new())
            .event_format(format.json().flatten_event(true));
        let subscriber = tracing_subscriber::registry().with(Switch { text, json });
        tracing::subscriber::with_default(subscriber, || {
            for format in [LogFormat::Text, LogFormat::Json] {
                let span = tracing::info_span!("conn", route = "r1", id = tracing::field::Empty);
                let _in = span.enter();
                // Recorded after the span was made.
                span.record("id", 7);
                set_format(format);
                tracing::info!("inside");
            }
        });
        set_format(LogFormat::Text);
        let written = String::from_utf8(crate::lock(&lines.0).clone()).unwrap();
        let lines: Vec<&str> = written.lines().collect();
        assert_eq!(lines.len(), 2, "{written}");
        assert!(
            lines[0].contains(r#"conn{route="r1" id=7}: inside"#),
            "{written}"
        );
        let json: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(json["span"]["route"], "r1", "{written}");
        assert_eq!(json["span"]["id"], 7, "{written}");
    }
}
