//! Wiping freed memory while secrets pass through buffers latch does not own.
//!
//! latch's own secret buffers are zeroized when dropped ([`SecretString`], `Zeroizing`,
//! [`SecretJson`]). The libraries a store's answer passes through are not: serde_json
//! unescapes a string with escapes into a scratch `Vec` and frees it; hyper reads the answer
//! into buffers it grows, splits and frees; rustls decrypts into buffers it resizes; a `Vec`
//! that grows leaves its old block behind. Freed, unwiped, those copies stay in the heap until
//! the allocator happens to reuse them.
//!
//! [`WipingAllocator`] is the process's global allocator: the system allocator, except that
//! while a *wipe scope* is active on the calling thread it zeroizes every block it frees (and a
//! reallocated block's old place) before handing it back. Outside a scope it costs one
//! thread-local read per `dealloc`/`realloc`.
//!
//! Scopes are synchronous and per thread, never held across an `.await`:
//! - [`scope`] around synchronous work (parsing an answer);
//! - [`Scoped`] around a future: the scope is entered for each `poll` and for the future's
//!   drop, so whatever the future frees on whichever worker thread polls it is wiped. The
//!   resolver runs every store call in one ([`crate::secrets::Resolver`]);
//! - [`WipingExecutor`] spawns hyper's connection tasks (the store clients' sockets, TLS and
//!   read buffers) as `Scoped` tasks, so what they free is wiped too.
//!
//! What it does not cover:
//! - memory still in use: a pooled connection's hyper read buffer and rustls's record buffer
//!   (rustls decrypts records in place and moves what is left to the front, leaving decrypted
//!   bytes in the buffer's unused part until later reads overwrite them) keep the last answer,
//!   as the server sent it, until they are overwritten or freed (wiped) when the connection
//!   closes (idle connections close after 30 s). rustls zeroizes its key material (traffic
//!   secrets, AEAD keys, PSKs) itself, not plaintext;
//! - the kernel's socket and pipe buffers, and the memory of `exec` helpers;
//! - copies made outside a scope: protocol code (SCRAM) works on [`SecretString`]s, which are
//!   wiped on drop, and should not copy them elsewhere;
//! - stack frames (serde_json and hyper keep secrets on the heap).
//!
//! The thread-local state is const-initialised and has no destructor, so reading it never
//! allocates, registers a destructor or fails, even while a thread is being torn down: the
//! allocator can use it without recursing.
//!
//! [`SecretString`]: crate::config::SecretString
//! [`SecretJson`]: crate::secrets::value::SecretJson

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

thread_local! {
    /// How many scopes are active on this thread (scopes nest).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// Bytes wiped on this thread since it started.
    static WIPED: Cell<u64> = const { Cell::new(0) };
}

/// The system allocator, zeroizing what is freed inside a wipe scope.
pub struct WipingAllocator;

#[global_allocator]
static GLOBAL: WipingAllocator = WipingAllocator;

fn in_scope() -> bool {
    DEPTH.try_with(|d| d.get() > 0).unwrap_or(false)
}

/// Zeroizes `len` bytes at `ptr` in a way the compiler cannot drop as a dead store before
/// `free`.
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes.
unsafe fn wipe(ptr: *mut u8, len: usize) {
    // SAFETY: the caller's promise.
    unsafe { libc::explicit_bzero(ptr.cast(), len) };
    let _ = WIPED.try_with(|w| w.set(w.get().wrapping_add(len as u64)));
}

// SAFETY: every method defers to `System` with the same layouts; `realloc` inside a scope is
// alloc + copy + wipe + dealloc, which is what `GlobalAlloc::realloc` promises.
unsafe impl GlobalAlloc for WipingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if in_scope() {
            // SAFETY: `ptr` is a live block of `layout.size()` bytes until freed below.
            unsafe { wipe(ptr, layout.size()) };
        }
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !in_scope() {
            // SAFETY: forwarded as is.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // The system's realloc may move the block and free the old one unwiped, or shrink in
        // place and keep the tail: move it ourselves.
        // SAFETY: the caller promises `new_size`, rounded up to `layout.align()`, fits isize.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: `new_size` is non-zero (the caller's promise).
        let new = unsafe { System.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are live and distinct; the copy fits both.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                wipe(ptr, layout.size());
                System.dealloc(ptr, layout);
            }
        }
        new
    }
}

/// An active wipe scope on this thread; `!Send`, so a `Send` future cannot hold one across an
/// `.await`.
struct Guard(PhantomData<*const ()>);

impl Guard {
    fn enter() -> Guard {
        DEPTH.with(|d| d.set(d.get() + 1));
        Guard(PhantomData)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get() - 1));
    }
}

/// Runs `f` with a wipe scope active on this thread: every block freed meanwhile (on this
/// thread) is zeroized first.
pub fn scope<R>(f: impl FnOnce() -> R) -> R {
    let _scope = Guard::enter();
    f()
}

/// Whether a wipe scope is active on this thread.
pub fn active() -> bool {
    in_scope()
}

/// Bytes this thread has wiped since it started (for tests and diagnostics).
pub fn wiped_on_this_thread() -> u64 {
    WIPED.with(Cell::get)
}

/// Appends `data` to `buf`; when `buf` must grow it moves to a new zeroizing buffer (at least
/// twice as large) and the old one is zeroized, rather than left behind by a reallocation
/// (which a wipe scope would also catch: this holds outside one too).
pub fn append(buf: &mut zeroize::Zeroizing<Vec<u8>>, data: &[u8]) {
    let need = buf.len() + data.len();
    if need > buf.capacity() {
        let mut bigger = zeroize::Zeroizing::new(Vec::with_capacity(need.max(2 * buf.capacity())));
        bigger.extend_from_slice(buf);
        *buf = bigger;
    }
    buf.extend_from_slice(data);
}

/// A future run inside a wipe scope: each `poll`, and dropping it (finished or cancelled),
/// happen with the scope active on the polling thread.
pub struct Scoped<F> {
    inner: Option<Pin<Box<F>>>,
}

impl<F: Future> Scoped<F> {
    pub fn new(future: F) -> Scoped<F> {
        Scoped {
            inner: Some(Box::pin(future)),
        }
    }
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _scope = Guard::enter();
        let inner = self
            .inner
            .as_mut()
            .expect("a wipe-scoped future polled after it finished");
        let out = std::task::ready!(inner.as_mut().poll(cx));
        // Dropped here, inside the scope, rather than whenever the executor drops us.
        self.inner = None;
        Poll::Ready(out)
    }
}

impl<F> Drop for Scoped<F> {
    fn drop(&mut self) {
        let _scope = Guard::enter();
        self.inner = None;
    }
}

/// hyper's executor for the store clients: `tokio::spawn`, each task [`Scoped`].
#[derive(Clone, Copy, Debug, Default)]
pub struct WipingExecutor;

impl<F> hyper::rt::Executor<F> for WipingExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(Scoped::new(future));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block written with `byte`, freed through the global allocator.
    fn write_and_free(byte: u8, len: usize) {
        let v = std::hint::black_box(vec![byte; len]);
        drop(v);
    }

    #[test]
    fn only_what_is_freed_inside_a_scope_is_wiped() {
        let before = wiped_on_this_thread();
        write_and_free(0xa5, 1000);
        assert_eq!(wiped_on_this_thread(), before, "wiped outside a scope");
        assert!(!active());

        scope(|| {
            assert!(active());
            write_and_free(0xa5, 1000);
            // nested scopes keep it active
            scope(|| write_and_free(0x5a, 24));
            assert!(active());
        });
        assert!(!active());
        let wiped = wiped_on_this_thread() - before;
        assert!(wiped >= 1024, "{wiped} bytes wiped");
        assert!(
            wiped < 1024 + 256,
            "{wiped} bytes wiped (something else was freed?)"
        );
    }

    #[test]
    fn a_realloc_inside_a_scope_wipes_the_old_block_and_keeps_the_contents() {
        let before = wiped_on_this_thread();
        let v = scope(|| {
            let mut v: Vec<u8> = Vec::with_capacity(100);
            v.extend_from_slice(&[7; 100]);
            v.reserve(10_000); // moves: the old 100 bytes are wiped
            v.shrink_to_fit(); // shrinks: the 10 100 are wiped
            v
        });
        assert_eq!(v, [7; 100]);
        assert!(wiped_on_this_thread() - before >= 100 + 10_100);
    }

    #[test]
    fn serde_json_scratch_is_wiped_inside_a_scope() {
        // An escaped string is unescaped into serde_json's scratch buffer, which grows and is
        // freed at the end of the parse.
        let text = format!(r#"{{"note":"{}"}}"#, "ab\\u0041cd".repeat(40));
        let before = wiped_on_this_thread();
        let v: serde_json::Value = scope(|| serde_json::from_str(&text).unwrap());
        let wiped = wiped_on_this_thread() - before;
        // scratch grew to hold 200 bytes (and its smaller blocks before that)
        assert!(wiped >= 200, "{wiped} bytes wiped");
        assert_eq!(v["note"].as_str().unwrap().len(), 200);
    }

    #[test]
    fn append_grows_by_moving_and_wipes_the_old_buffer_outside_a_scope_too() {
        let mut buf = zeroize::Zeroizing::new(Vec::with_capacity(4));
        let before = wiped_on_this_thread();
        append(&mut buf, b"abc");
        append(&mut buf, b"defgh"); // grows: 4 -> 8
        append(&mut buf, b"i"); // grows: 8 -> 16
        assert_eq!(&buf[..], b"abcdefghi");
        assert_eq!(buf.capacity(), 16);
        // no wipe scope: what was wiped was wiped by `Zeroizing`, not counted here
        assert_eq!(wiped_on_this_thread(), before);
    }

    #[tokio::test]
    async fn a_scoped_future_wipes_in_each_poll_and_on_drop_never_between() {
        let before = wiped_on_this_thread();
        Scoped::new(async {
            assert!(active());
            write_and_free(1, 512);
            tokio::task::yield_now().await;
            assert!(active());
            write_and_free(1, 512);
        })
        .await;
        assert!(!active());
        assert!(wiped_on_this_thread() - before >= 1024);

        // dropped before it finished: its state is freed inside a scope
        let big = vec![3u8; 4096];
        let pending = Scoped::new(async move {
            std::future::pending::<()>().await;
            drop(big);
        });
        let before = wiped_on_this_thread();
        drop(pending);
        assert!(wiped_on_this_thread() - before >= 4096);
    }
}
