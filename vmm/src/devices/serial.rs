//! The 8250 UART on COM1 (vm-superio), its output sent to a file, stdout or nowhere.
//!
//! Serial output is not held back by output commit (see docs): it is the operator's console.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState as SuperioState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::persist::Persist;

/// Raises the UART's interrupt through an irqfd.
pub struct EventFdTrigger(EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Errors of the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The saved receive FIFO does not fit the UART.
    #[error("serial state: receive fifo of {0} bytes does not fit")]
    Fifo(usize),
}

/// Where the guest's serial output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// COM1.
pub struct SerialDevice {
    inner: Serial<EventFdTrigger, NoEvents, SerialOut>,
}

/// Saved UART registers and receive FIFO.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SerialState {
    /// Divisor latch low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    /// A UART in its reset state.
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        Self { inner: Serial::new(EventFdTrigger(irq), out) }
    }

    /// Flushes buffered output.
    pub fn flush(&mut self) {
        let _ = self.inner.writer_mut().flush();
    }

    /// Flushes the output and replaces it with `out`, returning the old one: how a rebuilt VM
    /// takes over its predecessor's console ([`crate::vm::Vm::rebuild`]). The UART's registers
    /// are untouched (the UART writes each byte straight through, so no output is in flight).
    pub fn replace_output(&mut self, out: SerialOut) -> SerialOut {
        self.flush();
        std::mem::replace(self.inner.writer_mut(), out)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.inner.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            if let Err(e) = self.inner.write(offset as u8, data[0]) {
                tracing::warn!("serial write failed: {e:?}");
            }
            if offset == 0 && data[0] == b'\n' {
                let _ = self.inner.writer_mut().flush();
            }
        }
    }
}

impl Persist for SerialDevice {
    type State = SerialState;
    type ConstructorArgs = (EventFd, SerialOut);
    type Error = SerialError;

    fn save(&self) -> SerialState {
        let s = self.inner.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    fn restore((irq, out): Self::ConstructorArgs, s: &SerialState) -> Result<Self, SerialError> {
        let state = SuperioState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let inner = Serial::from_state(&state, EventFdTrigger(irq), NoEvents, out)
            .map_err(|_| SerialError::Fifo(s.in_buffer.len()))?;
        Ok(Self { inner })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_can_be_handed_over() {
        let (first, second) = (Shared::default(), Shared::default());
        let mut dev = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(first.clone()));
        dev.write(7, &[0x5a]);
        dev.write(0, b"a");
        let saved = dev.save();
        let mut old = dev.replace_output(Box::new(second.clone()));
        dev.write(0, b"b");
        assert_eq!(dev.save(), saved, "the registers stay");
        old.write_all(b"c").unwrap();
        assert_eq!((&*first.0.lock().unwrap(), &*second.0.lock().unwrap()), (&b"ac".to_vec(), &b"b".to_vec()));
    }

    #[test]
    fn output_and_state_round_trip() {
        let out = Shared::default();
        let mut dev = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(out.clone()));
        dev.write(7, &[0x5a]); // scratch
        dev.write(1, &[0x01]); // IER
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        let saved = dev.save();
        let restored = SerialDevice::restore((EventFd::new(0).unwrap(), Box::new(std::io::sink())), &saved).unwrap();
        assert_eq!(restored.save(), saved);
        let mut b = [0u8];
        let mut r = restored;
        r.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
    }
}
