// SPDX-License-Identifier: GPL-2.0
/*
 * Off-CPU time of chosen processes: the kernel and user stack a thread left
 * the CPU with, and how long it stayed away.
 *
 * At switch-out (the thread is still `current`) we note when and where it
 * stopped; at switch-in we add the time away to its {tgid, tid, stacks, state}
 * total. Threads that are still away when user space looks are read straight
 * out of `starts`; threads that were already away before we attached are found
 * by the task iterator `find_blocked`.
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
#define EFAULT 14
#define EEXIST 17

/*
 * The kernel stack at switch-out starts inside the tracing machinery: the BPF
 * program itself and the trampoline that called it. Skip those two frames so
 * that no profile ever shows them. The low 8 bits of the flags are the count.
 */
#define KERNEL_STACK_SKIP 2

/*
 * Drop reasons and stack ids are plain integers in the maps, so nothing else
 * would carry these enums into BTF; this anchor puts them in the skeleton's
 * types for the Rust side to use.
 */
const volatile struct enum_anchor enum_anchor = {};

/* Tunables, set by user space between open() and load(). */
const volatile __u32 target_tid = 0;		/* 0: every thread of the targets */
const volatile __u64 target_cgroup_id = 0;	/* 0: any cgroup */
const volatile __u64 min_block_ns = 1000000;
const volatile __u64 max_block_ns = ~0ULL;
const volatile __u32 state_mask = 0xf;		/* bits of enum thread_state */
/* Our pid namespace, when it is not the initial one (ino 0: initial). */
const volatile __u64 pidns_dev = 0;
const volatile __u64 pidns_ino = 0;

/* Processes to watch (tgids in our pid namespace). User space edits this live. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u8);
} targets SEC(".maps");

/*
 * In-flight blocks by host tid. A plain hash, not per-CPU: threads are often
 * woken on another CPU than the one they slept on.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32);
	__type(value, struct block_start);
} starts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, struct block_key);
	__type(value, struct block_total);
} blocked SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_STACK_TRACE);
	__uint(max_entries, 16384);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, MAX_STACK_DEPTH * sizeof(__u64));
} stacks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2048);
	__type(key, __u32);	/* tid, as in struct block_key */
	__type(value, struct preblocked_stack);
} preblocked_stacks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DROP_REASON_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} drops SEC(".maps");

/* Kernel locks target threads are contending for now, by host tid. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32);
	__type(value, struct lock_wait);
} lock_waits SEC(".maps");

/* Scratch space for one preblocked_stack: too big for the BPF stack. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct preblocked_stack);
} scratch SEC(".maps");

static __always_inline void count_drop(enum drop_reason reason)
{
	__u64 *counter = bpf_map_lookup_elem(&drops, &reason);

	if (counter)
		(*counter)++;
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

static __always_inline bool state_wanted(enum thread_state state)
{
	return state_mask & (1u << state);
}

/* The current thread's ids as seen from our pid namespace. */
static __always_inline bool current_ids(__u32 *tgid, __u32 *tid)
{
	if (pidns_ino) {
		struct bpf_pidns_info ns = {};

		if (bpf_get_ns_current_pid_tgid(pidns_dev, pidns_ino, &ns, sizeof(ns)))
			return false;
		*tgid = ns.tgid;
		*tid = ns.pid;
	} else {
		__u64 id = bpf_get_current_pid_tgid();

		*tgid = id >> 32;
		*tid = (__u32)id;
	}
	return *tid != 0;
}

/* A task's pid number in our pid namespace, or 0 if it is not visible there. */
static __always_inline __u32 pid_in_our_ns(struct pid *pid, __u32 level)
{
	struct upid upid = {};

	if (level > 31 || BPF_CORE_READ(pid, level) < level)
		return 0;
	bpf_core_read(&upid, sizeof(upid), &pid->numbers[level]);
	if (BPF_CORE_READ(upid.ns, ns.inum) != pidns_ino)
		return 0;
	return upid.nr;
}

/*
 * The owner of a sleeping lock, as a tid in our pid namespace. Mutexes and
 * rwsems keep their owner's task_struct in `owner`, with flag bits in the
 * low three bits; a rwsem held by readers keeps the last reader in.
 */
static __always_inline __u32 lock_owner(void *lock, __u32 *kind)
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
	if (pidns_ino) {
		struct task_struct *me = bpf_get_current_task_btf();

		/* Targets live in our namespace, so the waiter's level is ours. */
		return pid_in_our_ns(BPF_CORE_READ(owner_task, thread_pid),
				     BPF_CORE_READ(me, thread_pid, level));
	}
	return BPF_CORE_READ(owner_task, pid);
}

static __always_inline void on_switch_out(void *ctx, bool preempt, unsigned int prev_state)
{
	struct block_start start = {};
	__u32 host_tid = (__u32)bpf_get_current_pid_tgid();
	struct lock_wait *lock;
	__u32 tgid, tid;
	long stack_id;

	if (!current_ids(&tgid, &tid))
		return;
	if (!bpf_map_lookup_elem(&targets, &tgid))
		return;
	if (target_tid && tid != target_tid)
		return;
	if (target_cgroup_id && bpf_get_current_cgroup_id() != target_cgroup_id)
		return;
	start.state = classify_state(preempt, prev_state);
	if (!state_wanted(start.state))
		return;

	start.tgid = tgid;
	start.tid = tid;
	lock = bpf_map_lookup_elem(&lock_waits, &host_tid);
	if (lock) {
		__u32 holder;

		start.lock = *lock;
		/*
		 * The owner may have changed since the wait began (or been between
		 * owners then): who holds it as we go to sleep is the better answer.
		 */
		start.lock.kind &= ~LOCK_HOLDER_READER;
		holder = lock_owner((void *)lock->addr, &start.lock.kind);
		if (holder)
			start.lock.holder_tid = holder;
		else if (lock->kind & LOCK_HOLDER_READER)
			start.lock.kind |= LOCK_HOLDER_READER;
	}
	stack_id = bpf_get_stackid(ctx, &stacks, KERNEL_STACK_SKIP);
	if (stack_id < 0)
		count_drop(DROP_KERNEL_STACK);
	start.kernel_stack_id = stack_id < 0 ? STACK_ID_NONE : stack_id;
	stack_id = bpf_get_stackid(ctx, &stacks, BPF_F_USER_STACK);
	/* -EFAULT: no user stack at all (an io_uring worker, say); not a drop. */
	if (stack_id < 0 && stack_id != -EFAULT)
		count_drop(DROP_USER_STACK);
	start.user_stack_id = stack_id < 0 ? STACK_ID_NONE : stack_id;
	start.start_ns = bpf_ktime_get_ns();

	if (bpf_map_update_elem(&starts, &host_tid, &start, BPF_ANY))
		count_drop(DROP_START_MAP_FULL);
}

static __always_inline void on_switch_in(__u32 host_tid)
{
	struct block_start *start;
	struct block_total *total;
	struct block_key key = {};
	__u64 blocked_ns;

	start = bpf_map_lookup_elem(&starts, &host_tid);
	if (!start)
		return;
	blocked_ns = bpf_ktime_get_ns() - start->start_ns;
	key.tgid = start->tgid;
	key.tid = start->tid;
	key.kernel_stack_id = start->kernel_stack_id;
	key.user_stack_id = start->user_stack_id;
	key.state = start->state;
	key.lock = start->lock;
	bpf_map_delete_elem(&starts, &host_tid);

	if (blocked_ns < min_block_ns || blocked_ns > max_block_ns)
		return;

	total = bpf_map_lookup_elem(&blocked, &key);
	if (!total) {
		struct block_total zero = {};
		long err = bpf_map_update_elem(&blocked, &key, &zero, BPF_NOEXIST);

		if (err && err != -EEXIST) {
			count_drop(DROP_BLOCKED_MAP_FULL);
			return;
		}
		total = bpf_map_lookup_elem(&blocked, &key);
		if (!total)
			return;
	}
	__sync_fetch_and_add(&total->blocked_ns, blocked_ns);
	__sync_fetch_and_add(&total->count, 1);
}

SEC("tp_btf/sched_switch")
int BPF_PROG(sched_switch_btf, bool preempt, struct task_struct *prev,
	     struct task_struct *next, unsigned int prev_state)
{
	on_switch_out(ctx, preempt, prev_state);
	on_switch_in(next->pid);
	return 0;
}

/* For kernels whose BTF does not allow tp_btf here; fields need CO-RE reads. */
SEC("raw_tp/sched_switch")
int BPF_PROG(sched_switch_raw, bool preempt, struct task_struct *prev,
	     struct task_struct *next, unsigned int prev_state)
{
	on_switch_out(ctx, preempt, prev_state);
	on_switch_in(BPF_CORE_READ(next, pid));
	return 0;
}

SEC("tp_btf/contention_begin")
int BPF_PROG(contention_begin, void *lock, unsigned int flags)
{
	struct task_struct *me = bpf_get_current_task_btf();
	__u32 host_tid = (__u32)bpf_get_current_pid_tgid();
	struct lock_wait wait = {};
	struct mm_struct *mm;
	__u32 tgid, tid;

	if (!current_ids(&tgid, &tid) || !bpf_map_lookup_elem(&targets, &tgid))
		return 0;
	wait.addr = (__u64)lock;
	wait.kind = flags & 0xffff;
	/* How `perf lock contention` recognises mmap_lock: by its address. */
	mm = me->mm;
	if (mm && wait.addr == (__u64)mm + bpf_core_field_offset(struct mm_struct, mmap_lock))
		wait.kind |= LOCK_MMAP;
	wait.holder_tid = lock_owner(lock, &wait.kind);
	bpf_map_update_elem(&lock_waits, &host_tid, &wait, BPF_ANY);
	return 0;
}

SEC("tp_btf/contention_end")
int BPF_PROG(contention_end, void *lock, int ret)
{
	__u32 host_tid = (__u32)bpf_get_current_pid_tgid();

	bpf_map_delete_elem(&lock_waits, &host_tid);
	return 0;
}

/*
 * Walk every task once at the start of a capture and note the target threads
 * that are already off the CPU: they will never switch out inside the window,
 * so the sched_switch hook alone would miss exactly the threads a late trigger
 * must explain. They are entered in `starts` as if they had just blocked.
 */
SEC("iter/task")
int find_blocked(struct bpf_iter__task *ctx)
{
	struct task_struct *task = ctx->task;
	struct preblocked_stack *stack;
	struct block_start start = {};
	struct pt_regs *regs;
	__u32 zero = 0, host_tid, tgid, tid;
	unsigned int state;
	long bytes;

	if (!task)
		return 0;
	host_tid = task->pid;
	if (pidns_ino) {
		struct task_struct *me = bpf_get_current_task_btf();
		__u32 level = BPF_CORE_READ(me, thread_pid, level);

		tgid = pid_in_our_ns(BPF_CORE_READ(task, group_leader, thread_pid), level);
		tid = pid_in_our_ns(BPF_CORE_READ(task, thread_pid), level);
	} else {
		tgid = task->tgid;
		tid = task->pid;
	}
	if (!tid || !bpf_map_lookup_elem(&targets, &tgid))
		return 0;
	if (target_tid && tid != target_tid)
		return 0;
	if (target_cgroup_id &&
	    BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id) != target_cgroup_id)
		return 0;
	state = task->__state;
	if (state == TASK_RUNNING || task->on_cpu)
		return 0;
	start.state = classify_state(false, state);
	if (!state_wanted(start.state))
		return 0;

	stack = bpf_map_lookup_elem(&scratch, &zero);
	if (!stack)
		return 0;
	stack->tgid = tgid;
	regs = (struct pt_regs *)bpf_task_pt_regs(task);
	stack->user_ip = regs ? PT_REGS_IP_CORE(regs) : 0;
	stack->user_fp = regs ? PT_REGS_FP_CORE(regs) : 0;
	bytes = bpf_get_task_stack(task, stack->ips, sizeof(stack->ips), 0);
	stack->depth = bytes > 0 ? bytes / sizeof(__u64) : 0;
	if (bpf_map_update_elem(&preblocked_stacks, &tid, stack, BPF_ANY)) {
		count_drop(DROP_PREBLOCKED_MAP_FULL);
		return 0;
	}

	start.start_ns = bpf_ktime_get_ns();
	start.tgid = tgid;
	start.tid = tid;
	start.kernel_stack_id = STACK_ID_PREBLOCKED;
	start.user_stack_id = STACK_ID_PREBLOCKED;
	/* A thread that blocked after we attached already has a better entry. */
	bpf_map_update_elem(&starts, &host_tid, &start, BPF_NOEXIST);
	return 0;
}
