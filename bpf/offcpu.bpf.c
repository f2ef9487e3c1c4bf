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
/* Address-space calls smaller than this are not recorded; 0: none are. */
const volatile __u64 min_address_change = 64ULL << 20;
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
	__type(value, struct lock_wait_stack);
} lock_waits SEC(".maps");

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

/*
 * Entries in `calls_in_progress`, roughly (an entry a thread leaves behind
 * when it dies keeps it above zero, which only costs a lookup). sys_exit
 * runs for every system call on the machine; while this is zero, one
 * load is all it costs.
 */
__u64 calls_pending = 0;

/* Address-space calls of target threads that have not returned, by host tid. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct address_change);
} calls_in_progress SEC(".maps");

/* Finished large address-space calls, until user space takes them. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct event_key);
	__type(value, struct address_change);
} address_changes SEC(".maps");

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

/* Whether the current thread belongs to a target; its ids in our namespace. */
static __always_inline bool current_target(__u32 *tgid, __u32 *tid)
{
	return current_ids(tgid, tid) && bpf_map_lookup_elem(&targets, tgid);
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
 * A thread going to sleep in futex(): the user-space lock word it waits
 * on. Mutexes, condition variables and most user-space locks come down
 * to this. False for any other sleep.
 */
static __always_inline bool futex_wait(struct lock_wait *wait)
{
	struct task_struct *me = bpf_get_current_task_btf();
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(me);
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

static __always_inline void on_switch_out(void *ctx, bool preempt, unsigned int prev_state)
{
	struct block_start start = {};
	__u32 host_tid = (__u32)bpf_get_current_pid_tgid();
	struct lock_wait_stack *waits;
	struct lock_wait *lock = NULL;
	__u32 tgid, tid;
	long stack_id;

	if (!current_target(&tgid, &tid))
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
	waits = bpf_map_lookup_elem(&lock_waits, &host_tid);
	if (waits)
		lock = innermost_wait(waits);
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
	} else if (start.state == THREAD_STATE_SLEEPING) {
		futex_wait(&start.lock);
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

/*
 * A thread asleep on a futex is woken by the one that let go of the lock:
 * that thread is its holder, as far as anyone can tell from outside. Only
 * a waker of the same process counts; a timeout's wake-up runs in whatever
 * happened to be on the CPU.
 */
SEC("raw_tp/sched_wakeup")
int BPF_PROG(sched_wakeup, struct task_struct *wakee)
{
	__u32 host_tid = BPF_CORE_READ(wakee, pid);
	struct block_start *start;
	__u32 tgid, tid;

	start = bpf_map_lookup_elem(&starts, &host_tid);
	if (!start || !(start->lock.kind & LOCK_FUTEX) || start->lock.holder_tid)
		return 0;
	if (!current_ids(&tgid, &tid) || tgid != start->tgid || tid == start->tid)
		return 0;
	start->lock.holder_tid = tid;
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
	__u32 host_tid = (__u32)bpf_get_current_pid_tgid();
	struct lock_wait_stack *waits, fresh = {};
	struct lock_wait wait = {};
	struct mm_struct *mm;
	__u32 tgid, tid, depth;

	if (!current_target(&tgid, &tid))
		return 0;
	wait.addr = (__u64)lock;
	wait.kind = flags & 0xffff;
	/* How `perf lock contention` recognises mmap_lock: by its address. */
	mm = BPF_CORE_READ(me, mm);
	if (mm && wait.addr == (__u64)mm + bpf_core_field_offset(struct mm_struct, mmap_lock))
		wait.kind |= LOCK_MMAP;
	wait.holder_tid = lock_owner(lock, &wait.kind);

	waits = bpf_map_lookup_elem(&lock_waits, &host_tid);
	if (!waits) {
		fresh.waits[0] = wait;
		fresh.depth = 1;
		bpf_map_update_elem(&lock_waits, &host_tid, &fresh, BPF_ANY);
		return 0;
	}
	/* A wait inside a wait: keep the outer one for when the inner ends. */
	depth = waits->depth;
	if (depth < LOCK_WAIT_NESTING)
		waits->waits[depth & (LOCK_WAIT_NESTING - 1)] = wait;
	waits->depth = depth + 1;
	return 0;
}

SEC("raw_tp/contention_end")
int BPF_PROG(contention_end, void *lock, int ret)
{
	__u32 host_tid = (__u32)bpf_get_current_pid_tgid();
	struct lock_wait_stack *waits;

	waits = bpf_map_lookup_elem(&lock_waits, &host_tid);
	if (!waits)
		return 0;
	if (waits->depth <= 1)
		bpf_map_delete_elem(&lock_waits, &host_tid);
	else
		waits->depth--;
	return 0;
}

/*
 * mmap_lock holds, paired per thread and mm. A failed trylock holds nothing;
 * a read acquisition while holding for write is mmap_write_downgrade(); a
 * read acquisition while holding for read nests.
 */
SEC("raw_tp/mmap_lock_acquire_returned")
int BPF_PROG(mmap_lock_acquired, struct mm_struct *mm, bool write, bool success)
{
	struct mmap_hold_key key = { .mm = (__u64)mm };
	struct mmap_hold *hold, fresh = {};
	__u32 tgid, tid;

	if (!success || !current_target(&tgid, &tid))
		return 0;
	key.host_tid = (__u32)bpf_get_current_pid_tgid();
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
	if (bpf_map_update_elem(&mmap_holds, &key, &fresh, BPF_ANY))
		count_drop(DROP_LOCK_HOLD_MAP_FULL);
	return 0;
}

SEC("raw_tp/mmap_lock_released")
int BPF_PROG(mmap_lock_released, struct mm_struct *mm, bool write)
{
	struct mmap_hold_key key = { .mm = (__u64)mm };
	struct event_key event = {};
	struct lock_hold record = {};
	struct mmap_hold *hold;
	__u64 now = bpf_ktime_get_ns();
	__u32 tgid, tid;
	long stack_id;

	key.host_tid = (__u32)bpf_get_current_pid_tgid();
	hold = bpf_map_lookup_elem(&mmap_holds, &key);
	if (!hold)
		return 0;	/* taken before we attached, or not a target's */
	if (hold->depth > 1) {
		hold->depth--;
		return 0;
	}
	record.start_ns = hold->start_ns;
	record.duration_ns = now - hold->start_ns;
	record.flags = hold->flags;
	bpf_map_delete_elem(&mmap_holds, &key);
	if (record.duration_ns < min_block_ns || !current_ids(&tgid, &tid))
		return 0;

	record.lock_addr = (__u64)mm + bpf_core_field_offset(struct mm_struct, mmap_lock);
	record.tgid = tgid;
	record.tid = tid;
	bpf_get_current_comm(record.comm, sizeof(record.comm));
	stack_id = bpf_get_stackid(ctx, &stacks, BPF_F_USER_STACK);
	record.user_stack_id = stack_id < 0 ? STACK_ID_NONE : stack_id;
	if (stack_id < 0 && stack_id != -EFAULT)
		count_drop(DROP_USER_STACK);
	stack_id = bpf_get_stackid(ctx, &stacks, KERNEL_STACK_SKIP);
	record.kernel_stack_id = stack_id < 0 ? STACK_ID_NONE : stack_id;
	if (stack_id < 0)
		count_drop(DROP_KERNEL_STACK);
	event.tid = tid;
	event.start_ns = record.start_ns;
	if (bpf_map_update_elem(&lock_holds, &event, &record, BPF_ANY))
		count_drop(DROP_LOCK_HOLD_MAP_FULL);
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

static __always_inline __u64 distance(__u64 a, __u64 b)
{
	return a > b ? a - b : b - a;
}

/*
 * Large address-space calls of the targets: noted on entry with the caller's
 * user stack, kept on return if they moved at least min_address_change bytes.
 * The call number is compared first: every other call of every process
 * leaves after one comparison.
 */
SEC("raw_tp/sys_enter")
int BPF_PROG(sys_enter, struct pt_regs *regs, long id)
{
	struct address_change call = {};
	__u32 host_tid, tgid, tid;
	long stack_id;

	switch (id) {
	case NR_MMAP:
		call.call = ADDRESS_MMAP;
		break;
	case NR_MUNMAP:
		call.call = ADDRESS_MUNMAP;
		break;
	case NR_MREMAP:
		call.call = ADDRESS_MREMAP;
		break;
	case NR_BRK:
		call.call = ADDRESS_BRK;
		break;
	case NR_MADVISE:
		call.call = ADDRESS_MADVISE;
		break;
	default:
		return 0;
	}
	if (!min_address_change || !current_target(&tgid, &tid))
		return 0;

	call.addr = PT_REGS_PARM1_CORE_SYSCALL(regs);
	switch (call.call) {
	case ADDRESS_MMAP:
		call.size = PT_REGS_PARM2_CORE_SYSCALL(regs);
		call.arg = PT_REGS_PARM4_CORE_SYSCALL(regs);
		break;
	case ADDRESS_MADVISE:
		call.size = PT_REGS_PARM2_CORE_SYSCALL(regs);
		call.arg = PT_REGS_PARM3_CORE_SYSCALL(regs);
		break;
	case ADDRESS_MUNMAP:
		call.size = PT_REGS_PARM2_CORE_SYSCALL(regs);
		break;
	case ADDRESS_MREMAP:
		call.size = distance(PT_REGS_PARM2_CORE_SYSCALL(regs),
				     PT_REGS_PARM3_CORE_SYSCALL(regs));
		call.arg = PT_REGS_PARM4_CORE_SYSCALL(regs);
		break;
	case ADDRESS_BRK: {
		struct task_struct *me = bpf_get_current_task_btf();
		__u64 wanted = call.addr;

		/* From the old break to the one asked for (0 only asks). */
		call.addr = BPF_CORE_READ(me, mm, brk);
		call.size = wanted ? distance(call.addr, wanted) : 0;
		break;
	}
	}
	if (call.size < min_address_change)
		return 0;

	call.tgid = tgid;
	call.tid = tid;
	bpf_get_current_comm(call.comm, sizeof(call.comm));
	stack_id = bpf_get_stackid(ctx, &stacks, BPF_F_USER_STACK);
	if (stack_id < 0 && stack_id != -EFAULT)
		count_drop(DROP_USER_STACK);
	call.user_stack_id = stack_id < 0 ? STACK_ID_NONE : stack_id;
	call.start_ns = bpf_ktime_get_ns();
	host_tid = (__u32)bpf_get_current_pid_tgid();
	if (bpf_map_update_elem(&calls_in_progress, &host_tid, &call, BPF_NOEXIST)) {
		/* One in progress already: a thread makes one call at a time, so it is stale. */
		if (bpf_map_update_elem(&calls_in_progress, &host_tid, &call, BPF_EXIST))
			count_drop(DROP_ADDRESS_CHANGE_MAP_FULL);
		return 0;
	}
	__sync_fetch_and_add(&calls_pending, 1);
	return 0;
}

SEC("raw_tp/sys_exit")
int BPF_PROG(sys_exit, struct pt_regs *regs, long ret)
{
	__u32 host_tid;
	struct address_change *call;
	struct event_key event = {};

	if (!calls_pending)
		return 0;
	host_tid = (__u32)bpf_get_current_pid_tgid();
	call = bpf_map_lookup_elem(&calls_in_progress, &host_tid);
	if (!call)
		return 0;
	call->duration_ns = bpf_ktime_get_ns() - call->start_ns;
	call->ret = ret;
	/* The break the kernel actually set: the old one if it refused. */
	if (call->call == ADDRESS_BRK)
		call->size = distance(call->addr, ret);
	if (call->size >= min_address_change) {
		event.tid = call->tid;
		event.start_ns = call->start_ns;
		if (bpf_map_update_elem(&address_changes, &event, call, BPF_ANY))
			count_drop(DROP_ADDRESS_CHANGE_MAP_FULL);
	}
	if (!bpf_map_delete_elem(&calls_in_progress, &host_tid))
		__sync_fetch_and_sub(&calls_pending, 1);
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
