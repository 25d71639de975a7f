//! Shards: one single-threaded tokio runtime per core for the data path.
//!
//! A session's tasks (its bridge, its HTTP/2 connection, its local socket) wake each
//! other for every message. On the multi-threaded runtime they land on different
//! workers, and each wake-up is a futex call and a cache-line transfer: a profile of
//! new sessions showed about seven futex calls per session per gateway, and a single
//! bulk transfer ran 30–50% faster with one worker than with two (BENCHMARKS.md). So
//! a gateway's accepted TLS connections are handed to the least-loaded shard (a
//! forward's local Unix-socket callers are accepted on the first shard itself, which
//! keeps a caller unless another shard is less loaded), and everything they spawn runs
//! on that shard's thread; the dialling side keeps its pooled HTTP/2 connections per
//! shard, so a forwarded session and its connection share a thread too. The other
//! accept loops, the admin listener, reloads and signals stay on the main runtime.
//!
//! `PIPEBRIDGE_SHARDS=N` sets the number (default: the available cores);
//! `PIPEBRIDGE_SHARDS=0` turns shards off (everything on the main runtime, as before).

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio_util::task::TaskTracker;

/// The most shards started, whatever the core count or `PIPEBRIDGE_SHARDS` says.
const MAX_SHARDS: usize = 256;

static SHARDS: OnceLock<Vec<Handle>> = OnceLock::new();

/// Where the next tie between equally loaded shards starts looking (spreads sessions
/// that arrive while all shards are idle).
static NEXT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The shard index of this thread (`usize::MAX`: not a shard thread).
    static CURRENT: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// The number of shards `PIPEBRIDGE_SHARDS` asks for (default: the available cores, at
/// most [`MAX_SHARDS`]).
pub fn configured() -> Result<usize, String> {
    match std::env::var("PIPEBRIDGE_SHARDS") {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n <= MAX_SHARDS => Ok(n),
            _ => Err(format!(
                "PIPEBRIDGE_SHARDS={v:?}: expected a number from 0 (off) to {MAX_SHARDS}"
            )),
        },
        Err(_) => Ok(std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_SHARDS)),
    }
}

/// Starts `n` shard threads (once per process; later calls do nothing). `0` starts none.
/// Each runtime is built and dropped on its own thread (a runtime dropped on an async
/// worker would panic), and hands its handle back once it runs.
pub fn start(n: usize) -> std::io::Result<()> {
    if SHARDS.get().is_some() || n == 0 {
        return Ok(());
    }
    let mut shards = Vec::with_capacity(n);
    for i in 0..n {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("pb-shard-{i}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .on_thread_park(before_park)
                    .on_thread_unpark(after_unpark)
                    .enable_all()
                    // The shard's blocking pool (impersonated opens, FIFO waits).
                    .thread_name(format!("pb-blocking-{i}"))
                    .build();
                let rt = match rt {
                    Ok(rt) => {
                        let _ = tx.send(Ok(rt.handle().clone()));
                        rt
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                CURRENT.with(|c| c.set(i));
                // Runs the shard's tasks until the process exits.
                rt.block_on(anchor());
            })?;
        let handle = rx.recv().map_err(|_| {
            std::io::Error::other(format!("shard {i} ended before its runtime started"))
        })??;
        shards.push(handle);
    }
    let _ = SHARDS.set(shards);
    Ok(())
}

/// Period of a shard's anchor timer ([`anchor`]).
const ANCHOR_PERIOD: Duration = Duration::from_secs(1);

/// Keeps a timer due within [`ANCHOR_PERIOD`] on the shard at all times. tokio's time
/// driver wakes its own thread (an `eventfd` write, then one more turn of the event
/// loop) whenever a timer is set that is due sooner than every timer it had when it
/// last parked: with none pending, each new session's first bound (the dial timeout of
/// a forward) did that, a system call and a wake-up per session (`strace` of the
/// new-session phase). With this timer always due sooner, timeouts of a second or more
/// never do; it costs one wake-up a second.
async fn anchor() {
    let mut tick = tokio::time::interval(ANCHOR_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// `[tuning] busy_poll` in microseconds (0: off); read at every park, so a reload applies
/// at once.
static BUSY_POLL_US: AtomicU64 = AtomicU64::new(0);

/// Sets how long an idle shard keeps polling before it sleeps (`None`: never polls).
pub fn set_busy_poll(d: Option<Duration>) {
    let us = d.map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    BUSY_POLL_US.store(us, Ordering::Relaxed);
}

/// How often a polling shard checks that no thread waits for a core.
const RECHECK: Duration = Duration::from_micros(20);

/// Runnable threads beyond the core count that still let a shard poll. The count includes
/// the polling thread itself, which hands its core to a waiting thread at its next
/// `sched_yield` (within microseconds), so one thread more than there are cores does not
/// wait long. Measured on 2 cores (BENCHMARKS.md, eleventh session): with no slack the
/// polling shards of the echo pipeline (load client, two gateways, target) counted each
/// other and stopped, and echo p50 fell only from 269 to 209 µs; with a slack of 1 it fell
/// to 163 µs, with bulk, 64 and 512 connections level or better; a slack of 2 did no
/// better.
const RUNNABLE_SLACK: usize = 1;

/// Whether threads wait for a core on the host: more runnable threads (the fourth field
/// of `/proc/loadavg`) than [`RUNNABLE_SLACK`] allows. A polling core looks busy to the
/// kernel, so a thread woken while it polls queues behind a running one instead of
/// taking an idle core: with all cores taken, polling would slow the rest of the host
/// down. Where the count cannot be read (no `/proc`), the answer is yes: no polling.
fn threads_wait_for_a_core() -> bool {
    static LOADAVG: OnceLock<Option<(std::fs::File, usize)>> = OnceLock::new();
    let Some((f, cores)) = LOADAVG.get_or_init(|| {
        let f = std::fs::File::open("/proc/loadavg").ok()?;
        // The host's cores, not this process's share of them (affinity, cgroup quota):
        // the count is the host's too.
        let cores = std::fs::read_to_string("/sys/devices/system/cpu/online")
            .ok()
            .and_then(|t| cpu_list_len(&t))
            .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
            .unwrap_or(1);
        Some((f, cores))
    }) else {
        return true;
    };
    let mut buf = [0u8; 128];
    let Ok(n) = read_at(f, &mut buf) else {
        return true;
    };
    loadavg_runnable(&buf[..n]).is_none_or(|r| r > *cores + RUNNABLE_SLACK)
}

/// The runnable-thread count of a `/proc/loadavg` text: `"0.42 0.30 0.25 2/134 17975"`
/// gives 2.
fn loadavg_runnable(text: &[u8]) -> Option<usize> {
    let field = text.split(|&b| b == b' ').nth(3)?;
    let runnable = field.split(|&b| b == b'/').next()?;
    std::str::from_utf8(runnable).ok()?.parse().ok()
}

/// The number of CPUs in a kernel CPU list such as `/sys/devices/system/cpu/online`:
/// `"0-3,6,8-9\n"` gives 7.
fn cpu_list_len(text: &str) -> Option<usize> {
    let mut n = 0usize;
    for part in text.trim().split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo.parse::<usize>().ok()?, hi.parse::<usize>().ok()?),
            None => {
                let c = part.parse::<usize>().ok()?;
                (c, c)
            }
        };
        n += hi.checked_sub(lo)? + 1;
    }
    (n > 0).then_some(n)
}

#[cfg(unix)]
fn read_at(f: &std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(f, buf, 0)
}

#[cfg(not(unix))]
fn read_at(_: &std::fs::File, _: &mut [u8]) -> std::io::Result<usize> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// After a read that says data streams in ([`note_streaming`]), a shard does not poll for
/// this long: a bulk transfer keeps every process of its pipeline busy, and a polling
/// shard takes core time they need (bulk was 7–16% slower with polling, BENCHMARKS.md).
const STREAM_QUIET: Duration = Duration::from_millis(2);

thread_local! {
    /// Whether a read on this thread filled a big buffer since the last park.
    static STREAMING: Cell<bool> = const { Cell::new(false) };
}

/// Says that a read on this thread filled a big buffer (more data was waiting: a bulk
/// stream): the shard then does not busy-poll for [`STREAM_QUIET`]. Cheap enough for every
/// such read (a thread-local store).
pub fn note_streaming() {
    STREAMING.with(|s| s.set(true));
}

thread_local! {
    /// Whether a read on this thread got data since the last park.
    static TRAFFIC: Cell<bool> = const { Cell::new(false) };
}

/// Says that a read on this thread got data (a TLS connection's, a local endpoint's): a
/// polling shard's idle stretch starts again, so polling goes on while traffic does.
/// A thread-local store.
pub fn note_traffic() {
    TRAFFIC.with(|t| t.set(true));
}

/// A shard's busy-poll state (its own thread only).
#[derive(Clone, Copy)]
struct Poll {
    /// When the shard last ran out of work (the start of the current idle stretch).
    idle_since: Option<Instant>,
    /// Whether the driver is being polled (not slept in) this turn.
    polling: bool,
    /// Whether the last idle stretch was short enough that polling would have caught its
    /// end: polling only then, so sparse traffic never polls at all.
    armed: bool,
    /// When this shard last found every runnable thread of the host on a core of its own.
    cores_free_at: Option<Instant>,
    /// When a read last said data streams in ([`note_streaming`]).
    streamed_at: Option<Instant>,
}

/// A shard's busy-poll state before its first park.
const FRESH: Poll = Poll {
    idle_since: None,
    polling: false,
    armed: false,
    cores_free_at: None,
    streamed_at: None,
};

thread_local! {
    static POLL: Cell<Poll> = const { Cell::new(FRESH) };
}

/// tokio calls this each time the shard runs out of tasks, before it waits for the driver
/// (epoll, timers). While busy polling, it defers a no-op waker: tokio then polls the
/// driver without blocking (`epoll_wait` with a zero timeout) instead of sleeping, and
/// `sched_yield` lets any other runnable thread on this core go first.
///
/// Why: a sleeping thread's wake-up is the largest part of a small message's round trip
/// on a virtual machine (the profile of the echo phase: two thirds of the gateway's
/// samples in the scheduler's wake-up path). While traffic is steady (each idle stretch
/// shorter than the window), a shard that polls catches the next message without that
/// wake-up. The cost is CPU time while idle, bounded by the window per idle stretch, and
/// only while the stretches stay short. A shard never polls while threads wait for a core
/// ([`threads_wait_for_a_core`], checked every [`RECHECK`] while polling): then polling
/// would delay them, and it did, by up to a quarter of the 64-connection throughput
/// before the check (BENCHMARKS.md); nor for a while after a read found a data stream
/// ([`note_streaming`]).
fn before_park() {
    let polling = update_poll(|p, now, window| {
        let streaming = STREAMING.with(|s| s.replace(false));
        let traffic = TRAFFIC.with(|t| t.replace(false));
        park_turn(p, now, window, streaming, traffic, || {
            !threads_wait_for_a_core()
        })
    });
    if polling {
        let mut turn = std::pin::pin!(tokio::task::yield_now());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let _ = turn.as_mut().poll(&mut cx);
        std::thread::yield_now();
    }
}

/// Decides whether the shard polls (rather than sleeps) as it runs out of work at `now`:
/// `streaming` says a read since the last park found a data stream, `traffic` that a
/// read got data ([`note_traffic`]), `cores_free` checks that no thread waits for a core
/// (called at most every [`RECHECK`]).
///
/// Only traffic starts a new idle stretch while polling. (It used to be any turn that
/// took over 2 µs from the driver's return to the next park; on a busy host a polling
/// thread preempted in between counted as busy, so shards that polled kept each other
/// polling: a test of an idle gateway saw 140–250 ms of CPU in 2 s at a 10 ms window.)
fn park_turn(
    p: &mut Poll,
    now: Instant,
    window: Duration,
    streaming: bool,
    traffic: bool,
    cores_free: impl FnOnce() -> bool,
) -> bool {
    if traffic || p.idle_since.is_none() || !p.polling {
        p.idle_since = Some(now);
    }
    if streaming {
        p.streamed_at = Some(now);
    }
    let idle = p.idle_since.map_or(Duration::ZERO, |s| now - s);
    p.polling = p.armed && idle < window && p.streamed_at.is_none_or(|t| now - t > STREAM_QUIET);
    if p.polling && p.cores_free_at.is_none_or(|t| now - t > RECHECK) {
        p.polling = cores_free();
        if p.polling {
            p.cores_free_at = Some(now);
        }
    }
    p.polling
}

/// tokio calls this when the driver returns. After a real sleep it re-arms polling if the
/// idle stretch that just ended was shorter than the window.
fn after_unpark() {
    update_poll(|p, now, window| {
        unpark_turn(p, now, window);
        false
    });
}

/// The driver returned at `now`: after a real sleep, arms polling if the idle stretch that
/// ended was shorter than `window`.
fn unpark_turn(p: &mut Poll, now: Instant, window: Duration) {
    if !p.polling {
        p.armed = p.idle_since.is_some_and(|s| now - s < window);
    }
}

/// Runs `f` on this shard's busy-poll state with the time and the window, when busy
/// polling is on; returns what `f` returns (`false` when off).
fn update_poll(f: impl FnOnce(&mut Poll, Instant, Duration) -> bool) -> bool {
    let window = BUSY_POLL_US.load(Ordering::Relaxed);
    if window == 0 {
        return false;
    }
    let mut p = POLL.with(Cell::get);
    let out = f(&mut p, Instant::now(), Duration::from_micros(window));
    POLL.with(|c| c.set(p));
    out
}

/// The shards' runtimes (`None` when shards are off).
pub fn handles() -> Option<&'static [Handle]> {
    SHARDS.get().map(Vec::as_slice)
}

/// The shard this thread runs (`None` off the shard threads): keys per-shard pools.
pub fn current() -> Option<usize> {
    let i = CURRENT.with(Cell::get);
    (i != usize::MAX).then_some(i)
}

/// Whether shards run (else [`spawn`] runs tasks on the caller's runtime).
pub fn enabled() -> bool {
    SHARDS.get().is_some()
}

/// Runs `make(io)` as a task tracked by `tracker` on the least-loaded shard (fewest
/// tasks alive: connections, sessions, HTTP/2 connections alike), or on the caller's
/// runtime when shards are off. `io` is moved there before `make` runs, so sockets can be
/// registered with the shard's own reactor inside `make`.
pub fn spawn<T, F, Fut>(tracker: &TaskTracker, io: T, make: F)
where
    T: Send + 'static,
    F: FnOnce(T) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    // Boxed once (a session's future is kilobytes; by value it is copied whole at each
    // step of the spawn).
    let fut = Box::pin(async move { make(io).await });
    // `start` never stores an empty set.
    let Some(shards) = SHARDS.get() else {
        tracker.spawn(fut);
        return;
    };
    // The least loaded (not counting the calling task on its own shard); on a tie the
    // calling shard itself (a spawn there needs no wake-up of another thread), else the
    // next in turn.
    let first = NEXT.fetch_add(1, Ordering::Relaxed);
    let here = current();
    let pick = (0..shards.len())
        .map(|k| (first + k) % shards.len())
        .min_by_key(|&i| {
            let alive = shards[i].metrics().num_alive_tasks();
            if Some(i) == here {
                (alive.saturating_sub(1), false)
            } else {
                (alive, true)
            }
        })
        .expect("at least one shard");
    shards[pick].spawn(tracker.track_future(fut));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One turn of the event loop: the driver returns at `at`, work runs for `work`, and
    /// the shard runs out of it; returns whether it polls.
    fn turn(p: &mut Poll, at: Instant, work: Duration, streaming: bool) -> bool {
        let window = Duration::from_micros(200);
        unpark_turn(p, at, window);
        park_turn(p, at + work, window, streaming, !work.is_zero(), || true)
    }

    #[test]
    fn polls_for_steady_traffic_not_sparse_traffic_nor_streams() {
        let t0 = Instant::now();
        let us = Duration::from_micros;
        // Steady traffic: each idle stretch ends within the window, so the shard polls.
        let mut p = FRESH;
        assert!(!turn(&mut p, t0, us(10), false), "not armed yet");
        p.polling = false;
        assert!(
            turn(&mut p, t0 + us(60), us(10), false),
            "armed by a 50 us stretch"
        );
        // Polling turns without work keep the idle stretch going until the window ends.
        assert!(turn(&mut p, t0 + us(150), Duration::ZERO, false));
        assert!(turn(&mut p, t0 + us(260), Duration::ZERO, false));
        assert!(
            !turn(&mut p, t0 + us(280), Duration::ZERO, false),
            "window over"
        );
        // Sparse traffic: a 5 ms stretch disarms.
        let mut p = FRESH;
        turn(&mut p, t0, us(10), false);
        p.polling = false;
        assert!(!turn(&mut p, t0 + us(5_000), us(10), false));
        // A stream: no polling from a streaming read until STREAM_QUIET has passed.
        let mut p = FRESH;
        turn(&mut p, t0, us(10), false);
        p.polling = false;
        assert!(!turn(&mut p, t0 + us(60), us(10), true), "a streaming read");
        assert!(
            !turn(&mut p, t0 + us(120), us(10), false),
            "still within the quiet time"
        );
        let later = t0 + STREAM_QUIET + us(200);
        p.idle_since = Some(later - us(50));
        assert!(
            turn(&mut p, later, us(10), false),
            "polls again after the quiet time"
        );
        // Cores taken: no polling.
        let mut p = FRESH;
        turn(&mut p, t0, us(10), false);
        p.polling = false;
        p.armed = true;
        let window = us(200);
        assert!(!park_turn(&mut p, t0 + us(70), window, false, true, || {
            false
        }));
    }

    /// Polling turns that take long (the thread was preempted between the driver's
    /// return and the park, as on a busy host) but saw no traffic do not extend polling:
    /// it ends when the window since the last traffic does.
    #[test]
    fn slow_turns_without_traffic_do_not_keep_a_shard_polling() {
        let t0 = Instant::now();
        let us = Duration::from_micros;
        let window = us(200);
        let mut p = FRESH;
        assert!(!turn(&mut p, t0, us(10), false), "not armed yet");
        p.polling = false;
        assert!(turn(&mut p, t0 + us(60), us(10), false), "armed");
        // Each turn takes 40 us (preempted), without traffic.
        let mut at = t0 + us(70);
        let mut turns = 0;
        loop {
            unpark_turn(&mut p, at, window);
            let polls = park_turn(&mut p, at + us(40), window, false, false, || true);
            at += us(45);
            turns += 1;
            if !polls {
                break;
            }
            assert!(turns < 10, "still polling {turns} turns after the traffic");
        }
        // Traffic in a polling turn starts the idle stretch again: the same turns
        // without it stop polling at the last one.
        for traffic in [true, false] {
            let mut p = FRESH;
            turn(&mut p, t0, us(10), false);
            p.polling = false;
            assert!(turn(&mut p, t0 + us(60), us(10), false));
            unpark_turn(&mut p, t0 + us(250), window);
            assert!(park_turn(
                &mut p,
                t0 + us(255),
                window,
                false,
                traffic,
                || true
            ));
            unpark_turn(&mut p, t0 + us(400), window);
            assert_eq!(
                park_turn(&mut p, t0 + us(405), window, false, false, || true),
                traffic,
                "the window counts from the last traffic (traffic at 255 us: {traffic})"
            );
        }
    }

    #[test]
    fn cpu_list_len_counts_ranges_and_single_cpus() {
        assert_eq!(cpu_list_len("0-1\n"), Some(2));
        assert_eq!(cpu_list_len("0"), Some(1));
        assert_eq!(cpu_list_len("0-3,6,8-9\n"), Some(7));
        assert_eq!(cpu_list_len(""), None);
        assert_eq!(cpu_list_len("3-1"), None);
        assert_eq!(cpu_list_len("0-x"), None);
        #[cfg(target_os = "linux")]
        {
            let text = std::fs::read_to_string("/sys/devices/system/cpu/online")
                .expect("/sys/devices/system/cpu/online");
            let n = cpu_list_len(&text).expect("a CPU list");
            // This process may be limited to fewer CPUs than the host has, never more.
            let mine = std::thread::available_parallelism().map_or(1, |n| n.get());
            assert!(
                n >= mine,
                "{n} online CPUs, {mine} available to this process"
            );
        }
    }

    #[test]
    fn loadavg_runnable_reads_the_fourth_field() {
        assert_eq!(loadavg_runnable(b"0.42 0.30 0.25 2/134 17975\n"), Some(2));
        assert_eq!(loadavg_runnable(b"12.00 9.1 3.0 17/2048 1"), Some(17));
        assert_eq!(loadavg_runnable(b"0.42 0.30 0.25"), None);
        assert_eq!(loadavg_runnable(b"0.42 0.30 0.25 x/134 1"), None);
        assert_eq!(loadavg_runnable(b""), None);
        #[cfg(target_os = "linux")]
        {
            // This test's own thread is running.
            let text = std::fs::read("/proc/loadavg").expect("/proc/loadavg");
            assert!(loadavg_runnable(&text).is_some_and(|r| r >= 1), "{text:?}");
        }
    }
}
