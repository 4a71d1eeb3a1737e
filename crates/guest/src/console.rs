//! Console output: formatted text is collected in a line buffer on the stack and sent with one
//! hypercall per line (each hypercall is a VM exit, the scarce resource).
//!
//! `rebound run` copies the console to its standard output. Each [`print!`](crate::print) or
//! [`println!`](crate::println) sends what it formatted before it returns (a line at a time,
//! and the rest at the end), so nothing waits in a buffer when the guest exits or faults. A
//! line of up to 256 bytes is one write, so lines printed by different vCPUs do not mix.
//! Console errors are ignored: there is nowhere better to report them.
//!
//! ```no_run
//! use rebound_guest::{print, println};
//!
//! println!("{} + {} = {}", 1, 2, 1 + 2);
//! print!("no newline: ");
//! println!("the same line");
//! ```

use core::fmt;

/// A line buffer flushed on newline, when full (256 bytes), and on drop; what the macros use.
/// Use it directly to build one line from several `write!`s:
///
/// ```no_run
/// use core::fmt::Write;
/// use rebound_guest::console::Console;
///
/// let mut out = Console::new();
/// for i in 0..3 {
///     let _ = write!(out, "{i} ");
/// }
/// let _ = writeln!(out); // sent here, as one line
/// ```
pub struct Console {
    buf: [u8; 256],
    len: usize,
}

impl Default for Console {
    fn default() -> Self {
        Self::new()
    }
}

impl Console {
    /// An empty buffer.
    pub const fn new() -> Self {
        Self {
            buf: [0; 256],
            len: 0,
        }
    }

    /// Sends what is buffered (one hypercall, none if the buffer is empty).
    pub fn flush(&mut self) {
        if self.len > 0 {
            // Console errors cannot be reported anywhere better than the console itself.
            let _ = crate::hypercall::console_write(&self.buf[..self.len]);
            self.len = 0;
        }
    }
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
            if b == b'\n' {
                self.flush();
            }
        }
        Ok(())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Used by the macros.
#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    let mut c = Console::new();
    let _ = fmt::write(&mut c, args);
}

/// Prints to the VM console, like `std::print!`: sent before it returns, with no newline.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(format_args!($($arg)*)) };
}

/// Prints a line to the VM console, like `std::println!`.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::_print(format_args!("{}\n", format_args!($($arg)*))) };
}
