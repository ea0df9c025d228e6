//! Ring 0: long mode, descriptor tables, interrupt handlers, system calls (src/boot.S).
core::arch::global_asm!(include_str!("boot.S"), options(att_syntax));
