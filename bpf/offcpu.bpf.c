// SPDX-License-Identifier: GPL-2.0
/*
 * Off-CPU time of chosen processes: the kernel and user stack a thread left
 * the CPU with, and how long it stayed away.
 *
 * Every program runs for every process on the machine, so each one starts
 * by asking `target_bits` whether the thread's process is watched: one load
 * and a bit test. Anything else pays nothing more.
 *
 * For a target, a switch-out costs a timestamp in the thread's entry and a
 * switch-in one subtraction. Stacks are walked only for blocks that reach
 * min_block, which is when they are known to matter:
 *   - the kernel stack at switch-in, with bpf_get_task_stack(next): the
 *     thread is still asleep, so its stack is the one it blocked with (a
 *     thread waiting for a contended kernel lock has it taken at
 *     switch-out instead, see on_switch_out);
 *   - the user stack on the thread's way back to user space
 *     (rseq:rseq_update, in its own context, before it runs a single user
 *     instruction), with bpf_get_stack(): the user registers and stack
 *     are still those of the blocking call. A block that reached the
 *     unwind threshold gets a copy of both instead (copy_user_stack), for
 *     user space to unwind code without frame pointers. A thread that has not
 *     registered rseq (not glibc >= 2.35) or a kernel without the
 *     tracepoint gets its user stack at switch-out, as a switch-out walk
 *     would: by frame pointers, since how long the block will last is not
 *     known yet.
 * Blocks still in progress when user space looks are completed from
 * outside by the `survey` task iterator: the kernel stack of the sleeping
 * thread and the user registers it entered the kernel with, from which
 * user space walks its user stack. The same iterator finds the threads that
 * were already blocked when a capture began.
 *
 * One probe serves every freezeframe on the node (see capture/shared.rs):
 * each target carries its owner's settings and pid namespace, and every
 * record carries its process's host tgid, so that each instance reads only
 * what belongs to its own targets.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "offcpu.h"

char LICENSE[] SEC("license") = "GPL";

#define TASK_RUNNING 0x0
#define TASK_INTERRUPTIBLE 0x1
#define TASK_UNINTERRUPTIBLE 0x2
#define TASK_DEAD 0x80
#define EFAULT 14
#define EEXIST 17

/*
 * The kernel stack taken in the current context starts inside the tracing
 * machinery: the BPF program itself and the trampoline that called it. Skip
 * those two frames so that no profile ever shows them. The low 8 bits of the
 * flags are the count.
 */
#define KERNEL_STACK_SKIP 2

/*
 * Drop reasons and stack ids are plain integers in the maps, so nothing else
 * would carry these enums into BTF; this anchor puts them in the skeleton's
 * types for the Rust side to use.
 */
const volatile struct enum_anchor enum_anchor = {};

const volatile struct instance instance = {};

#ifdef FREEZEFRAME_VARIANT
/* A test build's mark: its object, and so its pin path, differ from ours. */
const volatile __u32 variant = FREEZEFRAME_VARIANT;
#endif

/*
 * Host tgids of the targets, one bit each. Set by the survey (which knows
 * both a task's host tgid and its tgid in its owner's namespace), cleared by
 * the owner through the mapped .bss; both sides change words atomically.
 */
__u64 target_bits[TARGET_WORDS];

/*
 * enum probe_feature bits, set by whoever attached the programs. Until
 * FEATURE_RSEQ is set (or on a kernel without it), user stacks are taken at
 * switch-out.
 */
__u32 attached = 0;

/* Processes being watched, by host tgid. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct target);
} targets SEC(".maps");

/* Processes instances asked for, until and while their surveys watch them. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct wanted_key);
	__type(value, struct wanted);
} wanted SEC(".maps");

/*
 * Target threads by host tid. A plain hash, not per-CPU: threads are often
 * woken on another CPU than the one they slept on. An entry lives from the
 * thread's first event to its last switch-out, so the map holds live threads
 * only.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32);
	__type(value, struct thread);
} threads SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, struct block_key);
	__type(value, struct block_total);
} blocked SEC(".maps");

/*
 * Every stack, kernel and user, by a 64-bit hash of its frames: the same
 * stack is stored once, and unlike a stack-trace map's buckets, two stacks
 * never collide into a drop.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u64);
	__type(value, struct stack);
} stacks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DROP_REASON_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} drops SEC(".maps");

/* mmap_lock holds of target threads in progress. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, struct mmap_hold_key);
	__type(value, struct mmap_hold);
} mmap_holds SEC(".maps");

/* Finished mmap_lock holds of at least min_block_ns, until user space takes them. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct event_key);
	__type(value, struct lock_hold);
} lock_holds SEC(".maps");

/* Each target thread's latest large address-space call, by host tid. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct address_change);
} calls_in_progress SEC(".maps");

/* Large address-space calls, as last seen, until user space takes them. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct event_key);
	__type(value, struct address_change);
} address_changes SEC(".maps");

/*
 * User stack copies of finished blocks, by id, until their owner takes them
 * at its next cut. Not preallocated: an entry's 16 KiB exist only while a
 * copy waits, and the map's bound is the budget (256 copies, 4 MiB, between
 * two cuts: over 1000 a second at the recorder's pace); a full map refuses a
 * copy at once, counted. (A ring buffer would size records to the stack,
 * but has one reader, and a shared probe has one owner per entry.)
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct stack_copy);
} stack_copies SEC(".maps");

/* Copies that fit in STACK_COPY_SMALL_BYTES, under the same rules. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct stack_copy_small);
} small_copies SEC(".maps");

/*
 * Where each thread's user stack ends, by host tid: the highest byte user
 * space had to read to unwind one of its stacks whole, down to the
 * thread's root frame. Every later stack of the thread lies below it, so a
 * copy stops there. A copy cut short by it that then fails to unwind (a
 * coroutine's stack, a tid reused) has its top taken away by user space.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u64);
} stack_tops SEC(".maps");

/* Copies are read a page at a time, so that an unmapped page ends one. */
#define STACK_COPY_CHUNK 4096

/*
 * Where a copy is put together before it goes into `stack_copies` whole,
 * with room after it for a last page read at any offset the verifier cannot
 * rule out, and this CPU's count of copies, which makes their ids unique.
 */
struct stack_copy_scratch {
	struct stack_copy copy;
	__u8 slack[STACK_COPY_CHUNK];
	__u64 copies;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct stack_copy_scratch);
} copy_scratch SEC(".maps");

/* Scratch space for one kernel stack: too big for the BPF stack. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct stack);
} scratch SEC(".maps");

static __always_inline void count_drop(enum drop_reason reason)
{
	__u64 *counter = bpf_map_lookup_elem(&drops, &reason);

	if (counter)
		(*counter)++;
}

static __always_inline bool is_target(__u32 host_tgid)
{
	__u32 word = host_tgid >> 6;

	/* The test and the index must be one register for the verifier to see the bound. */
	barrier_var(word);
	if (word >= TARGET_WORDS)
		return false;
	return target_bits[word] & (1ULL << (host_tgid & 63));
}

/* The current thread's host tgid: the key of the first test of every program. */
static __always_inline __u32 current_host_tgid(void)
{
	return bpf_get_current_pid_tgid() >> 32;
}

/*
 * A stack into `stacks`; its key, or STACK_NONE. `task` is a sleeping (or
 * not yet running) thread whose kernel stack to take; NULL takes the current
 * thread's, kernel or user as `flags` say (the raw_tp hook cannot name
 * another task to the kernel). Stacks of different processes never share a
 * key (see struct stack). The kernel leaves the scheduler's own frames
 * (schedule, __schedule, ...) out of another task's stack, so a block shows
 * where it waited, not how it went to sleep; user space leaves them out of
 * the current task's stacks too, so a wait has one stack. A thread without user memory
 * (a kernel thread, an io_uring worker, an exiting thread) has no user
 * stack, which is not a drop.
 */
static __always_inline __u64 stack_of(void *ctx, struct task_struct *task, __u64 flags)
{
	struct stack *stack;
	__u32 zero = 0, depth, host_tgid;
	__u64 hash = 0xcbf29ce484222325ULL;
	long bytes;

	stack = bpf_map_lookup_elem(&scratch, &zero);
	if (!stack)
		return STACK_NONE;
	if (task)
		bytes = bpf_get_task_stack(task, stack->ips, sizeof(stack->ips), 0);
	else
		bytes = bpf_get_stack(ctx, stack->ips, sizeof(stack->ips), flags);
	if (bytes <= 0) {
		if (bytes != -EFAULT && !(bytes == 0 && flags & BPF_F_USER_STACK))
			count_drop(flags & BPF_F_USER_STACK ? DROP_USER_STACK : DROP_KERNEL_STACK);
		return STACK_NONE;
	}
	depth = bytes / sizeof(__u64);
	stack->depth = depth;
	host_tgid = task ? BPF_CORE_READ(task, tgid) : bpf_get_current_pid_tgid() >> 32;
	stack->host_tgid = host_tgid;
	hash = (hash ^ host_tgid) * 0x100000001b3ULL;
	for (__u32 i = 0; i < MAX_STACK_DEPTH; i++) {
		if (i >= depth)
			break;
		hash = (hash ^ stack->ips[i]) * 0x100000001b3ULL;
	}
	hash |= 1;	/* odd: never one of enum stack_special */
	if (!bpf_map_lookup_elem(&stacks, &hash) &&
	    bpf_map_update_elem(&stacks, &hash, stack, BPF_NOEXIST) &&
	    !bpf_map_lookup_elem(&stacks, &hash)) {
		count_drop(DROP_STACK_MAP_FULL);
		return STACK_NONE;
	}
	return hash;
}

static __always_inline __u64 current_user_stack(void *ctx)
{
	return stack_of(ctx, NULL, BPF_F_USER_STACK);
}

static __always_inline __u64 current_kernel_stack(void *ctx)
{
	return stack_of(ctx, NULL, KERNEL_STACK_SKIP);
}

static __always_inline enum thread_state classify_state(bool preempt, unsigned int state)
{
	if (preempt || state == TASK_RUNNING)
		return THREAD_STATE_RUNNABLE;
	if (state & TASK_INTERRUPTIBLE)
		return THREAD_STATE_SLEEPING;
	if (state & TASK_UNINTERRUPTIBLE)
		return THREAD_STATE_DISK;
	return THREAD_STATE_OTHER;
}

static __always_inline bool state_wanted(const struct target_config *config,
					 enum thread_state state)
{
	return config->state_mask & (1u << state);
}

/* A pid's number in a namespace, or 0 if it is not visible there. */
static __always_inline __u32 pid_in(struct pid *pid, const struct pid_view *view)
{
	struct upid upid = {};
	__u32 level = view->level;

	if (level > 31 || BPF_CORE_READ(pid, level) < level)
		return 0;
	bpf_core_read(&upid, sizeof(upid), &pid->numbers[level]);
	if (BPF_CORE_READ(upid.ns, ns.inum) != view->ino)
		return 0;
	return upid.nr;
}

/* A task's ids as its owner sees them; false if it is not visible there. */
static __always_inline bool task_ids(struct task_struct *task, const struct pid_view *view,
				     __u32 *tgid, __u32 *tid)
{
	if (view->ino) {
		*tgid = pid_in(BPF_CORE_READ(task, group_leader, thread_pid), view);
		*tid = pid_in(BPF_CORE_READ(task, thread_pid), view);
	} else {
		*tgid = BPF_CORE_READ(task, tgid);
		*tid = BPF_CORE_READ(task, pid);
	}
	return *tid != 0;
}

/* The current thread's ids as its owner sees them. */
static __always_inline bool current_ids(const struct pid_view *view, __u32 *tgid, __u32 *tid)
{
	__u64 id;

	if (view->ino)
		return task_ids(bpf_get_current_task_btf(), view, tgid, tid);
	id = bpf_get_current_pid_tgid();
	*tgid = id >> 32;
	*tid = (__u32)id;
	return *tid != 0;
}

/* A fresh thread entry for a target: its ids, settings and namespace. */
static __always_inline bool enter_thread(struct task_struct *task, const struct target *target,
					 struct thread *fresh)
{
	const struct target_config *config = &target->config;

	if (!task_ids(task, &target->view, &fresh->key.tgid, &fresh->key.tid))
		return false;
	if (config->tid && fresh->key.tid != config->tid)
		return false;
	if (config->cgroup_id &&
	    BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id) != config->cgroup_id)
		return false;
	fresh->key.host_tgid = BPF_CORE_READ(task, tgid);
	fresh->config = *config;
	fresh->view = target->view;
	return true;
}

/*
 * The current target thread's entry, created on its first event. NULL for a
 * thread its owner's filters leave out or that its owner cannot see.
 */
static __always_inline struct thread *current_thread(__u32 host_tgid, __u32 host_tid)
{
	struct thread *thread = bpf_map_lookup_elem(&threads, &host_tid);
	struct thread fresh = {};
	struct target *target;

	if (thread)
		return thread;
	target = bpf_map_lookup_elem(&targets, &host_tgid);
	if (!target || !enter_thread(bpf_get_current_task_btf(), target, &fresh))
		return NULL;
	if (bpf_map_update_elem(&threads, &host_tid, &fresh, BPF_NOEXIST) &&
	    !bpf_map_lookup_elem(&threads, &host_tid)) {
		count_drop(DROP_THREAD_MAP_FULL);
		return NULL;
	}
	return bpf_map_lookup_elem(&threads, &host_tid);
}

/*
 * The owner of a sleeping lock, as a tid in the waiter's owner's namespace.
 * Mutexes and rwsems keep their owner's task_struct in `owner`, with flag
 * bits in the low three bits; a rwsem held by readers keeps the last reader
 * in.
 */
static __always_inline __u32 lock_owner(void *lock, __u32 *kind, const struct pid_view *view)
{
	struct task_struct *owner_task;
	long owner;

	if (*kind & LOCK_SPIN)
		return 0;
	if (*kind & LOCK_MUTEX)
		owner = BPF_CORE_READ((struct mutex *)lock, owner.counter);
	else if (*kind & (LOCK_READ | LOCK_WRITE))
		owner = BPF_CORE_READ((struct rw_semaphore *)lock, owner.counter);
	else
		return 0;
	if (!(*kind & LOCK_MUTEX) && (owner & 1))
		*kind |= LOCK_HOLDER_READER;
	owner_task = (struct task_struct *)(owner & ~7L);
	if (!owner_task)
		return 0;
	if (view->ino)
		return pid_in(BPF_CORE_READ(owner_task, thread_pid), view);
	return BPF_CORE_READ(owner_task, pid);
}

/* The wait a thread going to sleep now is sleeping for: the innermost kept. */
static __always_inline struct lock_wait *innermost_wait(struct lock_wait_stack *waits)
{
	__u32 depth = waits->depth;

	if (depth == 0)
		return NULL;
	if (depth > LOCK_WAIT_NESTING)
		depth = LOCK_WAIT_NESTING;
	return &waits->waits[(depth - 1) & (LOCK_WAIT_NESTING - 1)];
}

#if defined(__TARGET_ARCH_x86)
#define NR_FUTEX 202
#define NR_FUTEX_WAITV 449
#define SYSCALL_NR(regs) BPF_CORE_READ(regs, orig_ax)
#elif defined(__TARGET_ARCH_arm64)
#define NR_FUTEX 98
#define NR_FUTEX_WAITV 449
#define SYSCALL_NR(regs) BPF_CORE_READ(regs, syscallno)
#endif

/* futex() operations that wait for a lock word (FUTEX_CMD_MASK applied). */
#define FUTEX_WAIT 0
#define FUTEX_LOCK_PI 6
#define FUTEX_WAIT_BITSET 9
#define FUTEX_LOCK_PI2 13
#define FUTEX_CMD_MASK 0x7f

/*
 * A thread asleep in futex(): the user-space lock word it waits on, read
 * from the registers it entered the kernel with (which stay put while it
 * sleeps). Mutexes, condition variables and most user-space locks come down
 * to this. False for any other sleep.
 */
static __always_inline bool futex_wait(struct task_struct *task, struct lock_wait *wait)
{
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
	long nr, op;

	if (!regs)
		return false;
	nr = SYSCALL_NR(regs);
	if (nr == NR_FUTEX) {
		op = PT_REGS_PARM2_CORE_SYSCALL(regs) & FUTEX_CMD_MASK;
		if (op != FUTEX_WAIT && op != FUTEX_WAIT_BITSET && op != FUTEX_LOCK_PI &&
		    op != FUTEX_LOCK_PI2)
			return false;
		wait->addr = PT_REGS_PARM1_CORE_SYSCALL(regs);
	} else if (nr == NR_FUTEX_WAITV) {
		/* Several words at once; the vector's address stands for them. */
		wait->addr = PT_REGS_PARM1_CORE_SYSCALL(regs);
	} else {
		return false;
	}
	wait->kind = LOCK_FUTEX;
	wait->holder_tid = 0;
	return wait->addr != 0;
}

/* Names a sleeping thread's futex wait, once, when the block turns out to matter. */
static __always_inline void name_futex_wait(struct task_struct *task, struct thread *thread)
{
	if (thread->key.state == THREAD_STATE_SLEEPING && !thread->key.lock.addr)
		futex_wait(task, &thread->key.lock);
}

/* Adds a finished block to its total; `comm` names the thread if the total is new. */
static __always_inline void add_block(struct block_key *key, __u64 blocked_ns, const char *comm)
{
	struct block_total *total = bpf_map_lookup_elem(&blocked, key);

	if (!total) {
		struct block_total fresh = {};
		long err;

		__builtin_memcpy(fresh.comm, comm, COMM_LEN);
		err = bpf_map_update_elem(&blocked, key, &fresh, BPF_NOEXIST);
		if (err && err != -EEXIST) {
			count_drop(DROP_BLOCKED_MAP_FULL);
			return;
		}
		total = bpf_map_lookup_elem(&blocked, key);
		if (!total)
			return;
	}
	__sync_fetch_and_add(&total->blocked_ns, blocked_ns);
	__sync_fetch_and_add(&total->count, 1);
}

/*
 * The current thread's user registers and the top of its user stack, into
 * `stack_copies`, for user space to unwind without frame pointers: the
 * thread has not run a user instruction since it blocked, so both are still
 * those of the blocking call. Its key (STACK_COPY), or STACK_NONE when there
 * is nothing to copy or no room for it.
 */
static __always_inline __u64 copy_user_stack(struct thread *thread)
{
	struct task_struct *me = bpf_get_current_task_btf();
	struct stack_copy_scratch *copy;
	struct pt_regs *regs;
	__u32 zero = 0, size = 0, tid = (__u32)bpf_get_current_pid_tgid(), flags = 0;
	__u64 sp, chunk, limit = STACK_COPY_BYTES, *top;

	if (!me->mm)
		return STACK_NONE;	/* a kernel thread, or one exiting */
	regs = (struct pt_regs *)bpf_task_pt_regs(me);
	copy = bpf_map_lookup_elem(&copy_scratch, &zero);
	if (!regs || !copy)
		return STACK_NONE;
	sp = PT_REGS_SP_CORE(regs);
	top = bpf_map_lookup_elem(&stack_tops, &tid);
	if (top && *top > sp && *top - sp <= STACK_COPY_BYTES) {
		limit = *top - sp;
		flags |= STACK_COPY_TO_TOP;
	}
	/*
	 * Up to the end of sp's page, then page by page: bpf_probe_read_user
	 * fails on a range with any unmapped (or not present) byte in it, and
	 * the stack may end anywhere below STACK_COPY_BYTES.
	 */
	chunk = STACK_COPY_CHUNK - (sp & (STACK_COPY_CHUNK - 1));
	for (int page = 0; page <= STACK_COPY_BYTES / STACK_COPY_CHUNK; page++) {
		if (size >= limit)
			break;
		if (chunk > limit - size)
			chunk = limit - size;
		if (chunk > STACK_COPY_CHUNK || size + chunk > STACK_COPY_BYTES)
			break;
		if (bpf_probe_read_user(&copy->copy.bytes[size & (STACK_COPY_BYTES - 1)], chunk,
					(void *)(sp + size)))
			break;
		size += chunk;
		chunk = STACK_COPY_CHUNK;
	}
	if (!size || size > STACK_COPY_BYTES)
		return STACK_NONE;
	copy->copies++;
	copy->copy.id = copy->copies << 24 | (bpf_get_smp_processor_id() & 0xffff) << 8 |
			STACK_COPY;
	copy->copy.ip = PT_REGS_IP_CORE(regs);
	copy->copy.sp = sp;
	copy->copy.fp = PT_REGS_FP_CORE(regs);
	copy->copy.tgid = thread->key.tgid;
	copy->copy.host_tgid = thread->key.host_tgid;
	copy->copy.host_tid = tid;
	copy->copy.start_ns = thread->start_ns;
	copy->copy.size = size;
	if ((long)SYSCALL_NR(regs) < 0)
		flags |= STACK_COPY_FAULT;
	copy->copy.flags = flags;
	/* The small map's values are the first bytes of the same layout. */
	if (size <= STACK_COPY_SMALL_BYTES) {
		if (bpf_map_update_elem(&small_copies, &copy->copy.id, &copy->copy,
					BPF_NOEXIST))
			goto full;
	} else if (bpf_map_update_elem(&stack_copies, &copy->copy.id, &copy->copy, BPF_NOEXIST)) {
		goto full;
	}
	return copy->copy.id;
full:
	count_drop(DROP_STACK_COPY_FULL);
	return STACK_NONE;
}

/*
 * The current thread's owed block, now that its user stack can be taken:
 * copied for a block that reached the unwind threshold, else walked by its
 * frame pointers (as is one whose copy found no room).
 */
static __always_inline void settle_owed(void *ctx, struct thread *thread)
{
	char comm[COMM_LEN];

	thread->key.user_stack = STACK_NONE;
	if (thread->owed_ns >= thread->config.unwind_threshold_ns)
		thread->key.user_stack = copy_user_stack(thread);
	if (thread->key.user_stack == STACK_NONE)
		thread->key.user_stack = current_user_stack(ctx);
	bpf_get_current_comm(comm, sizeof(comm));
	add_block(&thread->key, thread->owed_ns, comm);
	thread->owed_ns = 0;
	thread->start_ns = 0;
}

/* A target thread's last switch-out: it is not a block, and it releases its entries. */
static __always_inline void thread_exits(void *ctx, __u32 host_tid)
{
	struct thread *thread = bpf_map_lookup_elem(&threads, &host_tid);

	if (thread && thread->owed_ns)
		settle_owed(ctx, thread);
	bpf_map_delete_elem(&threads, &host_tid);
	bpf_map_delete_elem(&calls_in_progress, &host_tid);
}

/*
 * `eager`: take both stacks and name the futex now, because the switch-in
 * cannot (the raw_tp hook, whose `next` is not a pointer the kernel's
 * helpers take). `rseq`: the thread has registered rseq, so that
 * rseq:rseq_update will run on its way back to user space.
 */
static __always_inline void on_switch_out(void *ctx, bool preempt, unsigned int prev_state,
					  __u32 host_tgid, __u32 host_tid, bool rseq, bool eager)
{
	enum thread_state state;
	struct lock_wait *lock;
	struct thread *thread;

	if (prev_state & TASK_DEAD) {
		thread_exits(ctx, host_tid);
		return;
	}
	thread = current_thread(host_tgid, host_tid);
	if (!thread)
		return;
	state = classify_state(preempt, prev_state);
	if (!state_wanted(&thread->config, state))
		return;
	/* Back in the kernel without a trip to user space: the same user stack. */
	if (thread->owed_ns)
		settle_owed(ctx, thread);

	thread->key.kernel_stack = 0;
	thread->key.user_stack = STACK_NONE;
	thread->key.state = state;
	thread->key.lock = (struct lock_wait){};
	thread->waker_tid = 0;
	thread->flags = 0;
	lock = innermost_wait(&thread->waits);
	if (lock) {
		__u32 holder;

		thread->key.lock = *lock;
		/*
		 * The owner may have changed since the wait began (or been between
		 * owners then): who holds it as we go to sleep is the better answer.
		 */
		thread->key.lock.kind &= ~LOCK_HOLDER_READER;
		holder = lock_owner((void *)lock->addr, &thread->key.lock.kind, &thread->view);
		if (holder)
			thread->key.lock.holder_tid = holder;
		else if (lock->kind & LOCK_HOLDER_READER)
			thread->key.lock.kind |= LOCK_HOLDER_READER;
	}
	/*
	 * A kernel lock's wait takes its kernel stack at switch-in like any
	 * other: the lock is named by the entry, and a stack of the sleeping
	 * task is what the survey gets for a wait that began before it.
	 */
	if (eager)
		thread->key.kernel_stack = current_kernel_stack(ctx);
	if (eager)
		name_futex_wait(bpf_get_current_task_btf(), thread);
	if (eager || !(attached & FEATURE_RSEQ) || !rseq)
		thread->key.user_stack = current_user_stack(ctx);
	thread->start_ns = bpf_ktime_get_ns();
}

/*
 * `trusted`: `next` may be handed to the kernel's task helpers (tp_btf);
 * from the raw_tp hook it may only be read, and the switch-out was eager.
 */
static __always_inline void on_switch_in(void *ctx, struct task_struct *next, bool trusted,
					 __u32 host_tid, bool rseq)
{
	struct thread *thread = bpf_map_lookup_elem(&threads, &host_tid);
	char comm[COMM_LEN];
	__u64 blocked_ns;

	if (!thread || !thread->start_ns || thread->owed_ns)
		return;
	blocked_ns = bpf_ktime_get_ns() - thread->start_ns;
	if (blocked_ns < thread->config.min_block_ns || blocked_ns > thread->config.max_block_ns) {
		thread->start_ns = 0;
		return;
	}

	/* The block matters: what it waited in, while the thread still sleeps. */
	if (trusted) {
		if (!thread->key.kernel_stack)
			thread->key.kernel_stack = stack_of(ctx, next, 0);
		name_futex_wait(next, thread);
	}
	if (thread->key.lock.kind & LOCK_FUTEX && !thread->key.lock.holder_tid)
		thread->key.lock.holder_tid = thread->waker_tid;
	if ((thread->key.user_stack == STACK_NONE || thread->key.user_stack == STACK_SAVED_REGS) &&
	    trusted && attached & FEATURE_RSEQ && rseq) {
		/*
		 * The user stack is taken on the thread's way back to user
		 * space; until then the entry keeps the block's start, so that
		 * user space still knows it (see settle_owed).
		 */
		thread->owed_ns = blocked_ns;
		return;
	}
	thread->start_ns = 0;
	/* Saved registers walked from outside cover the block in progress only. */
	if (thread->key.user_stack == STACK_SAVED_REGS)
		thread->key.user_stack = STACK_NONE;
	bpf_probe_read_kernel_str(comm, sizeof(comm), &next->comm);
	add_block(&thread->key, blocked_ns, comm);
}

SEC("tp_btf/sched_switch")
int BPF_PROG(sched_switch_btf, bool preempt, struct task_struct *prev,
	     struct task_struct *next, unsigned int prev_state)
{
	if (is_target(prev->tgid))
		on_switch_out(ctx, preempt, prev_state, prev->tgid, prev->pid, prev->rseq, false);
	if (is_target(next->tgid))
		on_switch_in(ctx, next, true, next->pid, next->rseq);
	return 0;
}

/*
 * For kernels whose BTF does not allow tp_btf here; fields need CO-RE reads,
 * and a switch-out takes its stacks at once (see on_switch_out).
 */
SEC("raw_tp/sched_switch")
int BPF_PROG(sched_switch_raw, bool preempt, struct task_struct *prev,
	     struct task_struct *next, unsigned int prev_state)
{
	if (is_target(BPF_CORE_READ(prev, tgid)))
		on_switch_out(ctx, preempt, prev_state, BPF_CORE_READ(prev, tgid),
			      BPF_CORE_READ(prev, pid), false, true);
	if (is_target(BPF_CORE_READ(next, tgid)))
		on_switch_in(ctx, next, false, BPF_CORE_READ(next, pid), false);
	return 0;
}

/*
 * A thread asleep on a futex is woken by the one that let go of the lock:
 * that thread is its holder, as far as anyone can tell from outside. Only
 * a waker of the same process counts; a timeout's wake-up runs in whatever
 * happened to be on the CPU. The wait is named only at switch-in, if it
 * turns out to matter, so every first waker is noted.
 *
 * sched_waking, not sched_wakeup: it runs in the waker's context, while
 * sched_wakeup of a wake-up queued to the wakee's CPU runs there, in
 * whatever that CPU was doing.
 */
static __always_inline void on_waking(__u32 wakee_tgid, __u32 wakee_tid)
{
	struct thread *thread;
	__u32 tgid, tid;

	if (!is_target(wakee_tgid) || current_host_tgid() != wakee_tgid)
		return;
	thread = bpf_map_lookup_elem(&threads, &wakee_tid);
	if (!thread || !thread->start_ns || thread->owed_ns || thread->waker_tid)
		return;
	if (!current_ids(&thread->view, &tgid, &tid) || tid == thread->key.tid)
		return;
	thread->waker_tid = tid;
}

SEC("tp_btf/sched_waking")
int BPF_PROG(sched_waking_btf, struct task_struct *wakee)
{
	on_waking(wakee->tgid, wakee->pid);
	return 0;
}

SEC("raw_tp/sched_waking")
int BPF_PROG(sched_waking_raw, struct task_struct *wakee)
{
	on_waking(BPF_CORE_READ(wakee, tgid), BPF_CORE_READ(wakee, pid));
	return 0;
}

/*
 * A thread on its way back to user space after it was switched out: the
 * first moment it is `current` again with its blocking call's user
 * registers, so a block that mattered gets its user stack here.
 */
SEC("raw_tp/rseq_update")
int BPF_PROG(rseq_update)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 host_tid = (__u32)id;
	struct thread *thread;

	if (!is_target(id >> 32))
		return 0;
	thread = bpf_map_lookup_elem(&threads, &host_tid);
	if (thread && thread->owed_ns)
		settle_owed(ctx, thread);
	return 0;
}

/*
 * The lock and mmap_lock programs are raw tracepoints: they attach where the
 * tracepoint exists (a kernel without it is told apart at attach, not load),
 * and BPF_PROG_TEST_RUN can drive them with made-up arguments.
 */
SEC("raw_tp/contention_begin")
int BPF_PROG(contention_begin, void *lock, unsigned int flags)
{
	struct task_struct *me = bpf_get_current_task_btf();
	__u64 id = bpf_get_current_pid_tgid();
	struct lock_wait wait = {};
	struct thread *thread;
	struct mm_struct *mm;
	__u32 depth;

	if (!is_target(id >> 32))
		return 0;
	thread = current_thread(id >> 32, (__u32)id);
	if (!thread)
		return 0;
	wait.addr = (__u64)lock;
	wait.kind = flags & 0xffff;
	/* How `perf lock contention` recognises mmap_lock: by its address. */
	mm = BPF_CORE_READ(me, mm);
	if (mm && wait.addr == (__u64)mm + bpf_core_field_offset(struct mm_struct, mmap_lock))
		wait.kind |= LOCK_MMAP;
	wait.holder_tid = lock_owner(lock, &wait.kind, &thread->view);

	/* A wait inside a wait: keep the outer one for when the inner ends. */
	depth = thread->waits.depth;
	if (depth < LOCK_WAIT_NESTING)
		thread->waits.waits[depth & (LOCK_WAIT_NESTING - 1)] = wait;
	thread->waits.depth = depth + 1;
	return 0;
}

SEC("raw_tp/contention_end")
int BPF_PROG(contention_end, void *lock, int ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 host_tid = (__u32)id;
	struct thread *thread;

	if (!is_target(id >> 32))
		return 0;
	thread = bpf_map_lookup_elem(&threads, &host_tid);
	if (thread && thread->waits.depth)
		thread->waits.depth--;
	return 0;
}

#if defined(__TARGET_ARCH_x86)
#define NR_MMAP 9
#define NR_MUNMAP 11
#define NR_BRK 12
#define NR_MREMAP 25
#define NR_MADVISE 28
#elif defined(__TARGET_ARCH_arm64)
#define NR_BRK 214
#define NR_MUNMAP 215
#define NR_MREMAP 216
#define NR_MMAP 222
#define NR_MADVISE 233
#else
#error "system call numbers are not known for this architecture"
#endif

#define MAP_POPULATE 0x8000
#define MAP_NONBLOCK 0x10000
#define VM_LOCKED 0x2000

/*
 * mmap_lock holds, paired per thread and mm. A failed trylock holds nothing;
 * a read acquisition while holding for write is mmap_write_downgrade(); a
 * read acquisition while holding for read nests.
 */
SEC("raw_tp/mmap_lock_acquire_returned")
int BPF_PROG(mmap_lock_acquired, struct mm_struct *mm, bool write, bool success)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct mmap_hold_key key = { .mm = (__u64)mm, .host_tid = (__u32)id };
	struct mmap_hold *hold, fresh = {};
	__u32 host_tgid = id >> 32;
	struct target *target;

	if (!success || !is_target(id >> 32))
		return 0;
	hold = bpf_map_lookup_elem(&mmap_holds, &key);
	if (hold) {
		if (write)
			return 0;	/* cannot happen: it would deadlock */
		if (hold->flags & HOLD_WRITE && !(hold->flags & HOLD_DOWNGRADED))
			hold->flags |= HOLD_DOWNGRADED;
		else
			hold->depth++;
		return 0;
	}
	fresh.start_ns = bpf_ktime_get_ns();
	fresh.depth = 1;
	fresh.flags = write ? HOLD_WRITE : 0;
	target = bpf_map_lookup_elem(&targets, &host_tgid);
	if (target && target->config.min_address_change) {
		struct task_struct *me = bpf_get_current_task_btf();
		struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(me);

		if (regs && SYSCALL_NR(regs) == NR_BRK)
			fresh.brk_before = BPF_CORE_READ(mm, brk);
	}
	if (bpf_map_update_elem(&mmap_holds, &key, &fresh, BPF_ANY))
		count_drop(DROP_LOCK_HOLD_MAP_FULL);
	return 0;
}

static __always_inline __u64 distance(__u64 a, __u64 b)
{
	return a > b ? a - b : b - a;
}

/*
 * The address-space call a thread releasing mmap_lock is in, from the
 * registers it entered the kernel with; false for anything else (a page
 * fault, mprotect, a /proc read, ...).
 */
static __always_inline bool address_call_of(struct mm_struct *mm, const struct mmap_hold *hold,
					    struct address_change *call)
{
	struct task_struct *me = bpf_get_current_task_btf();
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(me);

	if (!regs)
		return false;
	call->addr = PT_REGS_PARM1_CORE_SYSCALL(regs);
	switch (SYSCALL_NR(regs)) {
	case NR_MMAP:
		call->call = ADDRESS_MMAP;
		call->size = PT_REGS_PARM2_CORE_SYSCALL(regs);
		call->arg = PT_REGS_PARM4_CORE_SYSCALL(regs);
		/* vm_mmap_pgoff() populates after dropping the write hold. */
		if ((call->arg & MAP_POPULATE && !(call->arg & MAP_NONBLOCK)) ||
		    BPF_CORE_READ(mm, def_flags) & VM_LOCKED)
			call->flags = CHANGE_POPULATE_PENDING;
		return true;
	case NR_MUNMAP:
		call->call = ADDRESS_MUNMAP;
		call->size = PT_REGS_PARM2_CORE_SYSCALL(regs);
		return true;
	case NR_MREMAP:
		call->call = ADDRESS_MREMAP;
		call->size = distance(PT_REGS_PARM2_CORE_SYSCALL(regs),
				      PT_REGS_PARM3_CORE_SYSCALL(regs));
		call->arg = PT_REGS_PARM4_CORE_SYSCALL(regs);
		return true;
	case NR_BRK:
		/* From the break before the call to the one it set. */
		call->call = ADDRESS_BRK;
		call->addr = hold->brk_before;
		call->size = hold->brk_before ? distance(hold->brk_before, BPF_CORE_READ(mm, brk)) : 0;
		return true;
	case NR_MADVISE:
		call->call = ADDRESS_MADVISE;
		call->size = PT_REGS_PARM2_CORE_SYSCALL(regs);
		call->arg = PT_REGS_PARM3_CORE_SYSCALL(regs);
		return true;
	}
	return false;
}

/*
 * A large address-space call, seen through one of the mmap_lock holds it
 * took. A write hold begins a call (mmap, munmap, mremap and brk all take
 * one first); a read hold with the same call and arguments as the thread's
 * latest call continues it (population after mmap, MADV_POPULATE_* taking
 * the lock again). Each version is written to `address_changes`.
 */
static __always_inline void note_address_call(void *ctx, struct mm_struct *mm,
					      const struct mmap_hold *hold, __u64 now,
					      const struct target *target, __u32 host_tid,
					      __u32 tgid, __u32 tid)
{
	struct address_change call = {}, *latest;
	struct event_key event = {};

	if (!address_call_of(mm, hold, &call) || call.size < target->config.min_address_change)
		return;
	latest = bpf_map_lookup_elem(&calls_in_progress, &host_tid);
	if (latest && !(hold->flags & HOLD_WRITE) && latest->call == call.call &&
	    latest->addr == call.addr && latest->size == call.size && latest->arg == call.arg) {
		latest->duration_ns = now - latest->start_ns;
		latest->flags &= ~CHANGE_POPULATE_PENDING;
		call = *latest;
	} else {
		call.start_ns = hold->start_ns;
		call.duration_ns = now - hold->start_ns;
		call.tgid = tgid;
		call.tid = tid;
		call.host_tgid = bpf_get_current_pid_tgid() >> 32;
		call.user_stack = current_user_stack(ctx);
		bpf_get_current_comm(call.comm, sizeof(call.comm));
		if (bpf_map_update_elem(&calls_in_progress, &host_tid, &call, BPF_ANY))
			count_drop(DROP_ADDRESS_CHANGE_MAP_FULL);
	}
	event.tid = tid;
	event.start_ns = call.start_ns;
	if (bpf_map_update_elem(&address_changes, &event, &call, BPF_ANY))
		count_drop(DROP_ADDRESS_CHANGE_MAP_FULL);
}

SEC("raw_tp/mmap_lock_released")
int BPF_PROG(mmap_lock_released, struct mm_struct *mm, bool write)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct mmap_hold_key key = { .mm = (__u64)mm, .host_tid = (__u32)id };
	struct event_key event = {};
	struct lock_hold record = {};
	struct mmap_hold *hold, ended;
	__u32 host_tgid = id >> 32;
	struct target *target;
	__u64 now;
	__u32 tgid, tid;

	if (!is_target(host_tgid))
		return 0;
	hold = bpf_map_lookup_elem(&mmap_holds, &key);
	if (!hold)
		return 0;	/* taken before we attached */
	if (hold->depth > 1) {
		hold->depth--;
		return 0;
	}
	now = bpf_ktime_get_ns();
	ended = *hold;
	bpf_map_delete_elem(&mmap_holds, &key);
	target = bpf_map_lookup_elem(&targets, &host_tgid);
	if (!target || !current_ids(&target->view, &tgid, &tid))
		return 0;
	if (target->config.min_address_change)
		note_address_call(ctx, mm, &ended, now, target, key.host_tid, tgid, tid);
	if (now - ended.start_ns < target->config.min_block_ns)
		return 0;

	record.start_ns = ended.start_ns;
	record.duration_ns = now - ended.start_ns;
	record.flags = ended.flags;
	record.lock_addr = (__u64)mm + bpf_core_field_offset(struct mm_struct, mmap_lock);
	record.tgid = tgid;
	record.tid = tid;
	record.host_tgid = host_tgid;
	bpf_get_current_comm(record.comm, sizeof(record.comm));
	record.user_stack = current_user_stack(ctx);
	record.kernel_stack = current_kernel_stack(ctx);
	event.tid = tid;
	event.start_ns = record.start_ns;
	if (bpf_map_update_elem(&lock_holds, &event, &record, BPF_ANY))
		count_drop(DROP_LOCK_HOLD_MAP_FULL);
	return 0;
}

/* Our own namespace: the survey runs in the context of its reader, us. */
static __always_inline void own_view(struct pid_view *view)
{
	view->ino = instance.pidns_ino;
	view->level = 0;
	if (instance.pidns_ino)
		view->level = BPF_CORE_READ(bpf_get_current_task_btf(), thread_pid, level);
}

/* What we asked for about a task of our namespace, if we asked. */
static __always_inline struct wanted *wanted_of(struct task_struct *task,
						 const struct pid_view *view, __u32 *ns_tgid)
{
	struct wanted_key key = { .owner = instance.id };
	__u32 tid;

	if (!task_ids(task, view, &key.ns_tgid, &tid))
		return NULL;
	*ns_tgid = key.ns_tgid;
	return bpf_map_lookup_elem(&wanted, &key);
}

/*
 * A process we asked for, seen for the first time: it becomes ours, unless
 * another instance on the node watches it already (one owner per target).
 */
static __always_inline struct target *watch(struct task_struct *task, struct wanted *want,
					    const struct pid_view *view, __u32 ns_tgid)
{
	struct target fresh = {}, *target;
	__u32 host_tgid = task->tgid;

	fresh.owner = instance.id;
	fresh.view = *view;
	fresh.config = want->config;
	fresh.ns_tgid = ns_tgid;
	bpf_map_update_elem(&targets, &host_tgid, &fresh, BPF_NOEXIST);
	target = bpf_map_lookup_elem(&targets, &host_tgid);
	if (!target)
		return NULL;
	if (target->owner != instance.id) {
		want->status = WANTED_ELSEWHERE;
		return NULL;
	}
	want->host_tgid = host_tgid;
	want->status = WANTED_WATCHED;
	if (host_tgid >> 6 < TARGET_WORDS)
		__sync_fetch_and_or(&target_bits[(host_tgid >> 6) & (TARGET_WORDS - 1)],
				    1ULL << (host_tgid & 63));
	return target;
}

/*
 * Walks the tasks of our namespace (every one while a target is still to
 * be found, else only the targets', one process at a time) and completes
 * what the switch hooks cannot see, for our own targets only:
 *   - a process we asked for and see for the first time becomes a target
 *     and gets its host tgid bit;
 *   - a target thread already off the CPU with no entry (it blocked before
 *     we attached, or before its process became a target) is entered as a
 *     block that starts now: it would never switch out inside the window,
 *     so the switch hook alone would miss exactly the threads a late
 *     trigger must explain;
 *   - a block in progress gets, once, its kernel stack, its futex word and
 *     the user registers it entered the kernel with, for user space to
 *     walk its user stack: a frozen thread is reported while it is frozen.
 * Run by user space at every cut and whenever a target is added.
 */
/* Which address space a target has now, and how often it was changed (struct target). */
static __always_inline void note_address_space(struct target *target, struct task_struct *task)
{
	struct mm_struct *mm = task->mm;

	target->mm = (__u64)mm;
	target->mm_seq = 0;
	if (mm && bpf_core_field_exists(mm->mm_lock_seq))
		target->mm_seq = BPF_CORE_READ(mm, mm_lock_seq.sequence);
}

SEC("iter/task")
int survey(struct bpf_iter__task *ctx)
{
	struct task_struct *task = ctx->task;
	struct thread *thread, fresh = {};
	struct pid_view view = {};
	struct target *target;
	struct wanted *want;
	struct pt_regs *regs;
	__u32 host_tid, host_tgid, ns_tgid = 0;
	__u64 start_ns, kernel_stack;
	unsigned int state;

	if (!task)
		return 0;
	host_tgid = task->tgid;
	host_tid = task->pid;
	own_view(&view);
	target = bpf_map_lookup_elem(&targets, &host_tgid);
	if (!target) {
		want = wanted_of(task, &view, &ns_tgid);
		if (!want)
			return 0;
		target = watch(task, want, &view, ns_tgid);
		if (!target)
			return 0;
	} else if (target->owner != instance.id) {
		want = wanted_of(task, &view, &ns_tgid);
		if (want)
			want->status = WANTED_ELSEWHERE;
		return 0;
	}
	note_address_space(target, task);
	state = task->__state;
	if (state == TASK_RUNNING || task->on_cpu || state & TASK_DEAD)
		return 0;

	thread = bpf_map_lookup_elem(&threads, &host_tid);
	if (!thread) {
		if (!enter_thread(task, target, &fresh))
			return 0;
		fresh.key.state = classify_state(false, state);
		if (!state_wanted(&fresh.config, fresh.key.state))
			return 0;
		fresh.key.user_stack = STACK_NONE;
		fresh.start_ns = bpf_ktime_get_ns();
		fresh.flags = THREAD_PREBLOCKED;
		/* A thread that blocked since we looked already has a better entry. */
		bpf_map_update_elem(&threads, &host_tid, &fresh, BPF_NOEXIST);
		thread = bpf_map_lookup_elem(&threads, &host_tid);
		if (!thread)
			return 0;
	}
	start_ns = thread->start_ns;
	if (!start_ns || thread->owed_ns || thread->flags & THREAD_SURVEYED)
		return 0;

	kernel_stack = thread->key.kernel_stack ? thread->key.kernel_stack : stack_of(ctx, task, 0);
	/* It woke while we looked: the stack may be the running thread's. */
	if (thread->start_ns != start_ns || task->on_cpu)
		return 0;
	thread->key.kernel_stack = kernel_stack;
	name_futex_wait(task, thread);
	regs = (struct pt_regs *)bpf_task_pt_regs(task);
	if (regs && thread->key.user_stack == STACK_NONE && task->mm) {
		thread->user_ip = PT_REGS_IP_CORE(regs);
		thread->user_sp = PT_REGS_SP_CORE(regs);
		thread->user_fp = PT_REGS_FP_CORE(regs);
		thread->key.user_stack = STACK_SAVED_REGS;
		/* Entered through a fault, not a system call: no call number. */
		if (SYSCALL_NR(regs) == -1)
			thread->flags |= THREAD_USER_FAULT;
	}
	thread->flags |= THREAD_SURVEYED;
	return 0;
}
