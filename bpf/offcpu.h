/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The contract between offcpu.bpf.c and the Rust side. Every type that crosses
 * from the kernel into user space is declared here and nowhere else: the Rust
 * code uses the skeleton's generated `types::*`, never a mirror of its own.
 */
#ifndef FREEZEFRAME_OFFCPU_H
#define FREEZEFRAME_OFFCPU_H

/* PERF_MAX_STACK_DEPTH: the deepest stack the kernel will hand us. */
#define MAX_STACK_DEPTH 127

/* TASK_COMM_LEN: a thread's name as the kernel keeps it. */
#define COMM_LEN 16

/*
 * One bit per host tgid, for every pid the kernel can hand out
 * (PID_MAX_LIMIT, 4M): the first thing every program asks, in one load.
 */
#define TARGET_WORDS (1 << 16)

/*
 * What one freezeframe asked for one of its targets. The probe may be shared
 * by every freezeframe on the node, each with its own settings, so these
 * travel with the target rather than with the programs.
 */
struct target_config {
	__u64 min_block_ns;
	__u64 max_block_ns;
	__u64 cgroup_id;		/* 0: any cgroup */
	/* Address-space calls smaller than this are not recorded; 0: none are. */
	__u64 min_address_change;
	/*
	 * A finished block at least this long gets a copy of its user stack
	 * (see struct stack_copy) instead of a frame-pointer walk; ~0: none does.
	 */
	__u64 unwind_threshold_ns;
	__u32 tid;			/* 0: every thread of the target */
	__u32 state_mask;		/* bits of enum thread_state */
};

/*
 * The pid namespace a target's ids are reported in: its owner's. A task's
 * number there is `pid->numbers[level]`, if that entry's namespace is this
 * one.
 */
struct pid_view {
	__u64 ino;			/* 0: the initial namespace (host ids) */
	__u32 level;
	__u32 _pad;
};

/*
 * The freezeframe a program was loaded by; set between open() and load().
 * Only the survey reads it: every other program may have been loaded by an
 * instance that is gone, and serves every instance's targets.
 */
struct instance {
	__u64 id;			/* random, never 0 */
	__u64 pidns_ino;		/* 0: the initial namespace */
};

/* Tracepoints the probe's creator attached; bits of `attached` in .bss. */
enum probe_feature {
	FEATURE_SWITCH_RAW_TP = 1 << 0,	/* sched_switch via raw_tp, not tp_btf */
	FEATURE_LOCK_CONTENTION = 1 << 1,
	FEATURE_WAKING = 1 << 2,
	FEATURE_MMAP_LOCK = 1 << 3,
	/* rseq:rseq_update: user stacks are taken on the way back to user space. */
	FEATURE_RSEQ = 1 << 4,
};

/*
 * How a thread left the CPU. Each class is one bit of the `state_mask` filter
 * (1 << class).
 */
enum thread_state {
	THREAD_STATE_RUNNABLE = 0,	/* preempted: it wanted the CPU (R) */
	THREAD_STATE_SLEEPING = 1,	/* interruptible sleep (S) */
	THREAD_STATE_DISK = 2,		/* uninterruptible sleep (D) */
	THREAD_STATE_OTHER = 3,		/* stopped, traced, parked, ... */
};

/* Why the kernel side had to throw something away; the index into `drops`. */
enum drop_reason {
	DROP_THREAD_MAP_FULL = 0,	/* `threads` full: a thread's blocks went unseen */
	DROP_BLOCKED_MAP_FULL = 1,	/* `blocked` full: a finished block was lost */
	DROP_KERNEL_STACK = 2,		/* a kernel stack could not be walked */
	DROP_USER_STACK = 3,		/* a user stack could not be walked */
	DROP_STACK_MAP_FULL = 4,	/* `stacks` full: a stack was lost */
	DROP_LOCK_HOLD_MAP_FULL = 5,	/* `mmap_holds` or `lock_holds` full */
	DROP_ADDRESS_CHANGE_MAP_FULL = 6, /* `calls_in_progress` or `address_changes` full */
	DROP_STACK_COPY_FULL = 7,	/* `stack_copies` full: a frame-pointer walk instead */
	DROP_REASON_COUNT = 8,
};

/*
 * What a thread was waiting for when it blocked on a kernel lock. The low
 * bits are the kernel's lock:contention_begin flags (LCB_F_*); the high
 * ones are ours.
 */
enum lock_kind {
	LOCK_SPIN = 1 << 0,
	LOCK_READ = 1 << 1,
	LOCK_WRITE = 1 << 2,
	LOCK_RT = 1 << 3,
	LOCK_PERCPU = 1 << 4,
	LOCK_MUTEX = 1 << 5,
	/* The lock is the waiter's own mm->mmap_lock. */
	LOCK_MMAP = 1 << 16,
	/* A rwsem held by readers: the holder named is the last reader in. */
	LOCK_HOLDER_READER = 1 << 17,
	/*
	 * A user-space lock: the thread slept in futex() waiting on the word
	 * at `addr`; the holder named is the thread that woke it (the one
	 * that let go), 0 until it is woken.
	 */
	LOCK_FUTEX = 1 << 18,
};

/* A kernel lock a thread waits for; all zero when it waits for none. */
struct lock_wait {
	__u64 addr;
	__u32 kind;		/* enum lock_kind bits */
	__u32 holder_tid;	/* the owner at contention_begin, 0 if unknown */
};

/*
 * How deep contention nests: a thread waiting for a mutex or rwsem spins on
 * the lock's internal spinlock on the way to sleep, and that inner wait
 * begins and ends inside the outer one.
 */
#define LOCK_WAIT_NESTING 2

/* The kernel locks a thread is contending for, outermost first. */
struct lock_wait_stack {
	struct lock_wait waits[LOCK_WAIT_NESTING];
	/* Begins not yet ended; may exceed LOCK_WAIT_NESTING (the excess is not kept). */
	__u32 depth;
	__u32 _pad;
};

/* A thread's hold of one mm's mmap_lock, keyed by both. */
struct mmap_hold_key {
	__u64 mm;
	__u32 host_tid;
	__u32 _pad;
};

enum hold_flags {
	HOLD_WRITE = 1 << 0,		/* taken for write */
	HOLD_DOWNGRADED = 1 << 1,	/* taken for write, then downgraded to read */
};

struct mmap_hold {
	__u64 start_ns;
	/* mm->brk when a brk() call took the lock: the break it moves from. */
	__u64 brk_before;
	__u32 depth;		/* read acquisitions not yet released */
	__u32 flags;		/* enum hold_flags */
};

/* Identifies one finished hold or one address-space call: who and when. */
struct event_key {
	__u32 tid;
	__u32 _pad;
	__u64 start_ns;
};

/*
 * A target thread held its process's mmap_lock for at least min_block_ns.
 * The stacks are taken at release: the holder is still in the call that took
 * the lock, so the user stack is the acquiring call's; the kernel stack shows
 * where it let go (__mm_populate, __vm_munmap, ...).
 */
struct lock_hold {
	__u64 lock_addr;	/* &mm->mmap_lock, as contention_begin reports it */
	__u64 start_ns;
	__u64 duration_ns;
	__u64 user_stack;	/* keys in `stacks`, or enum stack_special */
	__u64 kernel_stack;
	__u32 tgid;
	__u32 tid;
	__u32 flags;		/* enum hold_flags */
	__u32 host_tgid;	/* whose record this is (see struct block_key) */
	/* The holder's name now: it may be gone by the time user space looks. */
	char comm[COMM_LEN];
};

/* The system calls that grow or shrink an address space by large amounts. */
enum address_call {
	ADDRESS_MMAP = 0,
	ADDRESS_MUNMAP = 1,
	ADDRESS_MREMAP = 2,
	ADDRESS_BRK = 3,
	ADDRESS_MADVISE = 4,
};

enum address_change_flags {
	/*
	 * The call will populate what it mapped (MAP_POPULATE, mlockall's
	 * MCL_FUTURE) under a read hold still to come: the record is not whole.
	 */
	CHANGE_POPULATE_PENDING = 1 << 0,
};

/*
 * One such call by a target thread, seen through the mmap_lock holds it
 * takes: from the first acquisition to the last release. The latest version
 * of a call in progress sits in `calls_in_progress`; every version is also
 * written to `address_changes`, where user space takes it.
 */
struct address_change {
	__u64 start_ns;
	__u64 duration_ns;
	__u64 addr;		/* the range's start (brk: the old break) */
	__u64 size;		/* bytes mapped, unmapped, remapped or advised */
	__u32 tgid;
	__u32 tid;
	__u32 call;		/* enum address_call */
	__u32 arg;		/* mmap flags, madvise advice, mremap flags */
	__u64 user_stack;	/* a key in `stacks`, or enum stack_special */
	__u32 flags;		/* enum address_change_flags */
	__u32 host_tgid;	/* whose record this is (see struct block_key) */
	char comm[COMM_LEN];	/* the caller's name (see struct lock_hold) */
};

/*
 * Stack references that are not keys in `stacks` (which are odd: a key is a
 * hash of the frames with the low bit set). Even references carry their
 * kind in the low byte.
 */
enum stack_special {
	/* No stack was recorded (see the matching drop counter). */
	STACK_NONE = 0,
	/*
	 * A user stack still to be walked from the thread's saved user
	 * registers: a block in progress, seen from outside by the survey.
	 */
	STACK_SAVED_REGS = 2,
	/*
	 * A user stack to be unwound from a copy in `stack_copies`; the
	 * reference is the copy's `id`, this kind in its low byte.
	 */
	STACK_COPY = 4,
	STACK_KIND_MASK = 0xff,
};

/*
 * The most of a user stack copied for a block, from its sp up: deep enough
 * for the frames of a typical blocking call chain (see the README on the
 * unwind threshold for what it costs).
 */
#define STACK_COPY_BYTES (16 << 10)

/*
 * A copy that fits in this many bytes goes into `small_copies`: a
 * map's values are copied whole, in the kernel and out to user space, so a
 * thread whose stack top is known (`stack_tops`) costs an eighth as much.
 */
#define STACK_COPY_SMALL_BYTES 2048

enum stack_copy_flags {
	/*
	 * The thread entered the kernel by an exception or interrupt (a page
	 * fault, a preemption), not a system call: `ip` is the instruction it
	 * stopped at, not a return address.
	 */
	STACK_COPY_FAULT = 1 << 0,
	/*
	 * The copy stops at the top of the thread's stack that `stack_tops`
	 * gave, not at the end of what could be read.
	 */
	STACK_COPY_TO_TOP = 1 << 1,
};

/*
 * A value of `stack_copies`: a finished block's user registers and the top
 * of its user stack, taken on the thread's way back to user space, before
 * it runs a user instruction. `size` bytes of the stack from `sp` up; they
 * stop at the first page that could not be read, so a copy holds only what
 * the stack really held, or at the thread's stack top where it is known.
 * Both sizes of copy have these fields, laid out the same.
 */
#define STACK_COPY_HEADER						\
	__u64 id;		/* the block's user_stack reference (STACK_COPY) */ \
	__u64 ip;							\
	__u64 sp;							\
	__u64 fp;							\
	__u32 tgid;		/* in its owner's pid namespace */		\
	__u32 size;							\
	__u32 flags;		/* enum stack_copy_flags */			\
	__u32 host_tgid;	/* whose copy this is (see struct block_key) */ \
	__u32 host_tid;		/* the block it was taken for: its thread ... */ \
	__u64 start_ns;		/* ... and its start, as struct thread had it */

struct stack_copy {
	STACK_COPY_HEADER
	__u8 bytes[STACK_COPY_BYTES];
};

/* A value of `small_copies`: the same, up to STACK_COPY_SMALL_BYTES. */
struct stack_copy_small {
	STACK_COPY_HEADER
	__u8 bytes[STACK_COPY_SMALL_BYTES];
};

/* What finished blocks are summed under. */
struct block_key {
	__u32 tgid;
	__u32 tid;
	/* Keys in `stacks`, or enum stack_special. */
	__u64 kernel_stack;
	__u64 user_stack;
	enum thread_state state;
	/* The process's host tgid: whose key this is, on a shared probe. */
	__u32 host_tgid;
	struct lock_wait lock;
};

struct block_total {
	__u64 blocked_ns;
	__u64 count;
	/* The thread's name when its first block here was added. */
	char comm[COMM_LEN];
};

enum thread_flags {
	/*
	 * The survey has completed the block in progress: its kernel stack,
	 * futex word and, for a thread with user memory, the registers it
	 * entered the kernel with (user_stack STACK_SAVED_REGS).
	 */
	THREAD_SURVEYED = 1 << 0,
	/* The block in `key` was found in progress when a capture began. */
	THREAD_PREBLOCKED = 1 << 1,
	/*
	 * The saved registers are a page fault's, not a system call's: user_ip
	 * is the faulting instruction itself, not the one after `syscall`.
	 */
	THREAD_USER_FAULT = 1 << 2,
};

/*
 * A target thread as the probe keeps it, by host tid, from its first event
 * to its exit. Reused in place: a switch costs stores, not a map update.
 * Ids are as seen from freezeframe's own pid namespace.
 */
struct thread {
	/*
	 * The block in progress (start_ns != 0), or the finished one that
	 * still owes its user stack (owed_ns != 0).
	 */
	struct block_key key;
	__u64 start_ns;		/* bpf_ktime_get_ns() at switch-out; 0 on the CPU */
	/*
	 * A finished block's length, until its user stack is taken; start_ns
	 * stays the block's start meanwhile.
	 */
	__u64 owed_ns;
	__u64 user_ip;		/* see THREAD_SURVEYED */
	__u64 user_sp;
	__u64 user_fp;
	__u32 waker_tid;	/* the first thread of its process to wake it from this block */
	__u32 flags;		/* enum thread_flags */
	struct lock_wait_stack waits;	/* kernel locks it contends for now */
	/* Its process's settings and namespace, copied from `targets` at entry. */
	struct target_config config;
	struct pid_view view;
};

/*
 * A stack's frames, innermost first. Its key hashes the process with the
 * frames, so that every stack has one owner on a shared probe, who alone
 * frees it.
 */
struct stack {
	__u32 depth;
	__u32 host_tgid;
	__u64 ips[MAX_STACK_DEPTH];
};

/* A process being watched, by host tgid; written by its owner's survey. */
struct target {
	__u64 owner;		/* struct instance id */
	struct pid_view view;
	struct target_config config;
	__u32 ns_tgid;		/* its tgid in its owner's namespace */
	/*
	 * Its address space as the owner's last survey found it: which one
	 * (the mm_struct's address, 0 if none) and how many times it has been
	 * locked for writing (mm->mm_lock_seq, odd while it is; 0 where the
	 * kernel has no such count). A module map read since is still whole
	 * while both stay the same: every change of a mapping takes that lock.
	 */
	__u32 mm_seq;
	__u64 mm;
};

/* A process an instance asked for, by its tgid in that instance's namespace. */
struct wanted_key {
	__u64 owner;
	__u32 ns_tgid;
	__u32 _pad;
};

enum wanted_status {
	WANTED_PENDING = 0,	/* the owner's survey has not seen it yet */
	WANTED_WATCHED = 1,	/* in `targets`, under host_tgid */
	WANTED_ELSEWHERE = 2,	/* another instance on the node watches it already */
};

struct wanted {
	struct target_config config;
	__u32 host_tgid;	/* set by the survey */
	__u32 status;		/* enum wanted_status */
};

/* Never used as data: makes the enums above part of the program's BTF. */
struct enum_anchor {
	enum drop_reason drop_reason;
	enum stack_special stack_special;
	enum lock_kind lock_kind;
	enum hold_flags hold_flags;
	enum address_call address_call;
	enum address_change_flags address_change_flags;
	enum thread_flags thread_flags;
	enum stack_copy_flags stack_copy_flags;
	enum probe_feature probe_feature;
	enum wanted_status wanted_status;
};

#endif /* FREEZEFRAME_OFFCPU_H */
