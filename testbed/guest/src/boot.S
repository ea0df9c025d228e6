/*
 * Ring 0 of the fixture guest (AT&T syntax, included by src/boot.rs through global_asm!).
 *
 * kvm-pvm emulates guest ring 0 at ~1 us per instruction and cannot emulate SSE, x87,
 * xsave, popcnt, int3 and a few more there, so everything ring 0 runs is in this file,
 * integer-only, and as short as possible: descriptor tables and page tables are built by the
 * assembler (.rept), not by loops at run time. Ring 0 only:
 *   - enters long mode from the PVH 32-bit entry (ebx = hvm_start_info),
 *   - loads the GDT (with a TSS carrying an all-zero I/O permission bitmap: kvm-pvm ignores
 *     IOPL for ring-3 port I/O) and the IDT, enables SSE for ring 3, masks the 8259s,
 *   - irets to ring 3 with IOPL=3, IF=1, rdi = hvm_start_info;
 *   - afterwards it runs the interrupt handlers and the int3 system calls only.
 * The LAPIC timer, the IOAPIC and everything else are programmed from ring 3 (Rust) through
 * the identity map, which is user-accessible. See docs/guest.md.
 *
 * No braces in this file: global_asm! treats it as a format string.
 */

    .set KERNEL_CS, 0x08
    .set KERNEL_DS, 0x10
    .set USER_DS, 0x1b
    .set USER_CS, 0x23
    .set TSS_SEL, 0x28
    .set LAPIC_EOI, 0xfee000b0
    .set COM1, 0x3f8
    .set VEC_SYSCALL, 3
    .set VEC_TIMER, 0x20
    .set VEC_DEV_BASE, 0x30
    .set NUM_DEV_VECS, 24
    .set SYS_HALT, 0
    .set SYS_EXIT, 1
    .set SYS_FLUSH_TLB, 2

/* ---- PVH entry note: XEN_ELFNOTE_PHYS32_ENTRY (18), owner "Xen", 32-bit entry address ---- */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long _start32
    .balign 4

/* ---- 32-bit entry: protected mode, paging off, ebx = hvm_start_info ---- */
    .section .text.boot, "ax", @progbits
    .code32
    .globl _start32
_start32:
    cli
    cld
    mov %ebx, %edi                  /* survives into 64-bit mode as rdi */
    lgdt gdt_ptr
    mov $pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x620, %eax                 /* PAE | OSFXSR | OSXMMEXCPT */
    mov %eax, %cr4
    mov $0xc0000080, %ecx           /* EFER */
    rdmsr
    or $0x100, %eax                 /* LME */
    wrmsr
    mov %cr0, %eax
    and $0x9ffffff3, %eax           /* clear CD, NW, TS, EM */
    or $0x80010023, %eax            /* PG | WP | NE | MP | PE */
    mov %eax, %cr0
    ljmp $KERNEL_CS, $start64

    .code64
start64:
    mov $KERNEL_DS, %eax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    mov $kstack_top, %rsp
    mov $TSS_SEL, %eax
    ltr %ax
    lidt idt_ptr(%rip)
    mov $0xff, %al                  /* mask both 8259s: nothing arrives through LINT0 */
    out %al, $0x21
    out %al, $0xa1
    pushq $USER_DS                  /* iretq to ring 3: ss, rsp, rflags, cs, rip */
    pushq $ustack_top
    pushq $0x3202                   /* IOPL=3 | IF | reserved bit 1 */
    pushq $USER_CS
    pushq $ring3_entry
    iretq

/* ---- interrupt and exception stubs: vector v at isr_table + 16 * v ---- */
    .section .text.isr, "ax", @progbits
    .balign 4096
    .globl isr_table
isr_table:
    .set vec, 0
    .rept 256
    .balign 16
    .if vec == VEC_SYSCALL
    jmp syscall_entry
    .elseif vec == VEC_TIMER
    jmp timer_isr
    .elseif (vec >= VEC_DEV_BASE) && (vec < VEC_DEV_BASE + NUM_DEV_VECS)
    push %rax
    mov $(vec - VEC_DEV_BASE), %eax
    jmp dev_isr
    .elseif (vec == 2) || (vec == 0xff)
    iretq                           /* NMI, LAPIC spurious: nothing to do, no EOI */
    .elseif (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    pushq $vec                      /* the CPU pushed an error code */
    jmp exc_common
    .else
    pushq $0
    pushq $vec
    jmp exc_common
    .endif
    .set vec, vec + 1
    .endr

    .section .text.boot, "ax", @progbits
/* LAPIC timer: count the tick, count the interrupt, EOI. */
timer_isr:
    push %rax
    incq GUEST_TICKS(%rip)
    incq GUEST_IRQ_COUNT(%rip)
    mov $LAPIC_EOI, %eax
    movl $0, (%rax)
    pop %rax
    iretq

/* Device interrupt for GSI eax (rax pushed by the stub): set its pending bit, count, EOI. */
dev_isr:
    btsq %rax, GUEST_IRQ_PENDING(%rip)
    incq GUEST_IRQ_COUNT(%rip)
    mov $LAPIC_EOI, %eax
    movl $0, (%rax)
    pop %rax
    iretq

/*
 * System calls: `int3` from ring 3 (DPL-3 interrupt gate on vector 3), number in rax,
 * result in rax, every other register preserved.
 *   SYS_HALT (0)      rdi = address of a u64, rsi = value: if *rdi == rsi, sti; hlt (wait for
 *                     the next interrupt, which runs before this returns). Race-free with
 *                     GUEST_IRQ_COUNT: interrupts are off until the hlt. Returns 0.
 *   SYS_EXIT (1)      stop for good (cli; hlt forever).
 *   SYS_FLUSH_TLB (2) reload CR3 after ring 3 edited the page tables. Returns 0.
 * Anything else returns -1.
 */
syscall_entry:
    cmp $SYS_HALT, %rax
    je 1f
    cmp $SYS_FLUSH_TLB, %rax
    je 3f
    cmp $SYS_EXIT, %rax
    je halt_forever
    mov $-1, %rax
    iretq
1:  cmp %rsi, (%rdi)
    jne 2f
    sti
    hlt
    cli
2:  xor %eax, %eax
    iretq
3:  mov %cr3, %rax
    mov %rax, %cr3
    xor %eax, %eax
    iretq

/* Fatal exception. Stack: vector, error code, rip, cs, rflags, rsp, ss. Print and stop. */
exc_common:
    mov %rsp, %rbp
    lea msg_exc(%rip), %rsi
    call k_puts
    mov 0(%rbp), %rax
    call k_putdec
    lea msg_err(%rip), %rsi
    call k_puts
    mov 8(%rbp), %rax
    call k_puthex
    lea msg_rip(%rip), %rsi
    call k_puts
    mov 16(%rbp), %rax
    call k_puthex
    lea msg_rsp(%rip), %rsi
    call k_puts
    mov 40(%rbp), %rax
    call k_puthex
    lea msg_cr2(%rip), %rsi
    call k_puts
    mov %cr2, %rax
    call k_puthex
    lea msg_ring(%rip), %rsi
    call k_puts
    mov 24(%rbp), %rax
    and $3, %eax
    call k_putdec
    lea msg_nl(%rip), %rsi
    call k_puts
halt_forever:
    cli
    hlt
    jmp halt_forever

/* Print the NUL-terminated string at rsi on COM1. Clobbers rax, rdx, rsi. */
k_puts:
    mov $COM1, %edx
1:  movb (%rsi), %al
    test %al, %al
    jz 2f
    out %al, %dx
    inc %rsi
    jmp 1b
2:  ret

/* Print rax as 16 hex digits. Clobbers rax, rbx, rcx, rdx. */
k_puthex:
    mov %rax, %rbx
    mov $16, %ecx
    mov $COM1, %edx
1:  rol $4, %rbx
    mov %ebx, %eax
    and $0xf, %eax
    cmp $10, %eax
    jb 2f
    add $0x27, %eax                 /* 'a' - '0' - 10 */
2:  add $0x30, %eax
    out %al, %dx
    dec %ecx
    jnz 1b
    ret

/* Print rax in decimal. Clobbers rax, rcx, rdx, rsi, rdi. */
k_putdec:
    sub $32, %rsp
    lea 31(%rsp), %rdi
    movb $0, (%rdi)
    mov $10, %ecx
1:  xor %edx, %edx
    div %rcx
    add $0x30, %dl
    dec %rdi
    movb %dl, (%rdi)
    test %rax, %rax
    jnz 1b
    mov %rdi, %rsi
    call k_puts
    add $32, %rsp
    ret

/* ---- ring 3 entry: zero .bss, set up the stack and the FPU, call guest_main(rdi) ---- */
    .text
    .globl ring3_entry
ring3_entry:
    mov %rdi, %r12
    lea __bss_start(%rip), %rdi
    lea __bss_end(%rip), %rcx
    sub %rdi, %rcx
    xor %eax, %eax
    rep stosb
    lea ustack_top(%rip), %rsp
    xor %ebp, %ebp
    fninit
    ldmxcsr mxcsr_default(%rip)
    mov %r12, %rdi
    call guest_main
    ud2

    .section .rodata
    .balign 4
mxcsr_default:
    .long 0x1f80
msg_exc:
    .asciz "\r\nguest exception vector="
msg_err:
    .asciz " err=0x"
msg_rip:
    .asciz " rip=0x"
msg_rsp:
    .asciz " rsp=0x"
msg_cr2:
    .asciz " cr2=0x"
msg_ring:
    .asciz " ring="
msg_nl:
    .asciz "\r\n"

/* ---- tables, all built by the assembler ---- */
    .section .data.boot, "aw", @progbits
    .balign 4096
    .globl pml4
pml4:                               /* P | RW | US | A on every level: one user-accessible map */
    .quad pdpt + 0x27
    .fill 511, 8, 0
    .globl pdpt
pdpt:
    .quad pd_low + 0x27
    .quad pd_low + 0x1000 + 0x27
    .quad pd_low + 0x2000 + 0x27
    .quad pd_low + 0x3000 + 0x27
    .fill 508, 8, 0
    /* 0-4 GiB in 2 MiB pages (P | RW | US | A | D | PS); 3-4 GiB (the MMIO hole) uncached.
     * Ring 3 makes RAM inside the hole cacheable and maps RAM above 4 GiB (SYS_FLUSH_TLB). */
    .globl pd_low
pd_low:
    .set addr, 0
    .rept 2048
    .if addr >= 0xc0000000
    .quad addr + 0xff
    .else
    .quad addr + 0xe7
    .endif
    .set addr, addr + 0x200000
    .endr

    .balign 16
gdt:
    .quad 0
    .quad 0x00af9b000000ffff        /* 0x08 kernel code, 64-bit */
    .quad 0x00cf93000000ffff        /* 0x10 kernel data */
    .quad 0x00cff3000000ffff        /* 0x18 user data (selector 0x1b) */
    .quad 0x00affb000000ffff        /* 0x20 user code, 64-bit (selector 0x23) */
    .word 0x2068                    /* 0x28 TSS: limit = 104 + 8192 + 1 - 1 */
    .word tss_lo16
    .byte tss_mid8
    .byte 0x89                      /* present, available 64-bit TSS */
    .byte 0
    .byte tss_hi8
    .long 0
    .long 0
gdt_end:
    .balign 8
gdt_ptr:                            /* read as 6 bytes in 32-bit mode, fine: below 4 GiB */
    .word gdt_end - gdt - 1
    .quad gdt

    .balign 16
idt:
    .set vec, 0
    .rept 256
    .word isr_table_lo16 + vec * 16 /* isr_table is page aligned: no carry into bits 16+ */
    .word KERNEL_CS
    .if vec == 8
    .byte 1                         /* double fault on IST1 */
    .else
    .byte 0
    .endif
    .if vec == VEC_SYSCALL
    .byte 0xee                      /* present, DPL 3, interrupt gate */
    .else
    .byte 0x8e                      /* present, DPL 0, interrupt gate */
    .endif
    .word isr_table_hi16
    .long 0
    .long 0
    .set vec, vec + 1
    .endr
idt_end:
    .balign 8
idt_ptr:
    .word idt_end - idt - 1
    .quad idt

    .balign 16
    .globl tss
tss:
    .long 0
    .quad kstack_top                /* rsp0 */
    .quad 0, 0                      /* rsp1, rsp2 */
    .quad 0
    .quad df_stack_top              /* ist1 */
    .quad 0, 0, 0, 0, 0, 0          /* ist2-7 */
    .quad 0
    .word 0
    .word 104                       /* I/O permission bitmap offset */
    .fill 8192, 1, 0                /* every port allowed */
    .byte 0xff

    .section .bss.boot, "aw", @nobits
    .balign 4096
kstack:
    .skip 16384
kstack_top:
df_stack:
    .skip 4096
df_stack_top:
    .globl ustack
ustack:
    .skip 0x100000
    .globl ustack_top
ustack_top:
