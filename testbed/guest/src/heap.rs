//! The global allocator: size classes for small blocks over a linked_list_allocator heap.
//!
//! linked_list_allocator is first-fit over one free list, which gets slow with many small
//! blocks (a store of thousands of keys). Blocks of up to 4 KiB therefore come from
//! power-of-two classes whose freed blocks are kept on per-class lists and reused; larger
//! ones go to the heap directly. Ring 3 is single-threaded and interrupt handlers (ring 0)
//! never allocate, so a plain `UnsafeCell` is the lock.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::{self, NonNull};
use linked_list_allocator::Heap;

const MIN_CLASS_SHIFT: u32 = 4; // 16 bytes
const MAX_CLASS_SHIFT: u32 = 12; // 4 KiB
const CLASSES: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;
const CLASS_ALIGN_MAX: usize = 64;

struct Inner {
    heap: Heap,
    free: [*mut u8; CLASSES],
}

/// The guest's allocator.
pub struct GuestAlloc(UnsafeCell<Inner>);

// SAFETY: the guest runs one thread (ring 3) and its interrupt handlers do not allocate.
unsafe impl Sync for GuestAlloc {}

#[global_allocator]
static ALLOC: GuestAlloc = GuestAlloc(UnsafeCell::new(Inner { heap: Heap::empty(), free: [ptr::null_mut(); CLASSES] }));

/// The class index and block layout for `layout`, if it is small.
fn class_of(layout: Layout) -> Option<(usize, Layout)> {
    let size = layout.size().max(layout.align()).max(1 << MIN_CLASS_SHIFT);
    if size > 1 << MAX_CLASS_SHIFT || layout.align() > CLASS_ALIGN_MAX {
        return None;
    }
    let shift = usize::BITS - (size - 1).leading_zeros();
    let block = 1usize << shift;
    let idx = (shift - MIN_CLASS_SHIFT) as usize;
    Layout::from_size_align(block, block.min(CLASS_ALIGN_MAX)).ok().map(|l| (idx, l))
}

// SAFETY: blocks handed out are disjoint heap memory of at least the requested size and
// alignment (class blocks are power-of-two sized and aligned to min(size, 64), and only
// layouts whose alignment that satisfies use them).
unsafe impl GlobalAlloc for GuestAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: single-threaded, not re-entered (see the Sync impl).
        let inner = unsafe { &mut *self.0.get() };
        match class_of(layout) {
            Some((idx, block)) => {
                let head = inner.free[idx];
                if !head.is_null() {
                    // SAFETY: free blocks store the next pointer in their first word.
                    inner.free[idx] = unsafe { (head as *mut *mut u8).read() };
                    return head;
                }
                inner.heap.allocate_first_fit(block).map_or(ptr::null_mut(), NonNull::as_ptr)
            }
            None => inner.heap.allocate_first_fit(layout).map_or(ptr::null_mut(), NonNull::as_ptr),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as in alloc.
        let inner = unsafe { &mut *self.0.get() };
        match class_of(layout) {
            Some((idx, _)) => {
                // SAFETY: the block is at least 16 bytes and no longer in use.
                unsafe { (ptr as *mut *mut u8).write(inner.free[idx]) };
                inner.free[idx] = ptr;
            }
            // SAFETY: ptr came from allocate_first_fit with this layout.
            None => unsafe { inner.heap.deallocate(NonNull::new_unchecked(ptr), layout) },
        }
    }
}

/// Gives the heap `size` bytes at `start` (once, before the first allocation).
///
/// # Safety
/// The range must be mapped RAM used by nothing else, for the rest of the guest's life.
pub unsafe fn init(start: u64, size: u64) {
    // SAFETY: called once at start-up, before anything allocates.
    let inner = unsafe { &mut *ALLOC.0.get() };
    // SAFETY: the caller hands the range over.
    unsafe { inner.heap.init(start as *mut u8, size as usize) };
}

/// Grows the heap by `by` bytes directly above its current top.
///
/// # Safety
/// The bytes above the heap's top must be mapped RAM used by nothing else.
pub unsafe fn extend(by: u64) {
    // SAFETY: no allocation is in progress (single-threaded).
    let inner = unsafe { &mut *ALLOC.0.get() };
    // SAFETY: the caller hands the range over.
    unsafe { inner.heap.extend(by as usize) };
}

/// Heap size in bytes.
pub fn size() -> u64 {
    // SAFETY: a read while nothing allocates.
    unsafe { (*ALLOC.0.get()).heap.size() as u64 }
}
