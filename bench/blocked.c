/*
 * A service whose threads spend most of their time blocked, built as
 * distributions build C (-O2 -fomit-frame-pointer, the system's glibc), so
 * that every user stack it blocks in needs the unwind tables.
 *
 *   blocked THREADS LONG_MS SHORT_MS SHORTS
 *
 * Each thread blocks for about LONG_MS at a time (spread by thread, so
 * that the threads do not wake together), half of them in nanosleep and
 * half in a futex wait (pthread_cond_timedwait), then SHORTS times for
 * SHORT_MS in nanosleep, and over again. The long blocks span the
 * recorder's cuts; the short ones mostly begin and end between two.
 *
 * Prints `ready PID` once its threads run; runs until killed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

/* Keeps a call from becoming a tail call, which would leave no frame. */
static volatile unsigned long after_call;
#define NOT_A_TAIL_CALL() (after_call++)
#define FRAME __attribute__((noinline))

static long long long_ms, short_ms;
static int shorts;
static pthread_mutex_t nobody_signals_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t nobody_signals = PTHREAD_COND_INITIALIZER;

static void sleep_ms(long long ms)
{
	struct timespec wait = { .tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000 };

	while (nanosleep(&wait, &wait) && errno == EINTR)
		;
}

static void futex_wait_ms(long long ms)
{
	struct timespec until;

	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_sec += ms / 1000;
	until.tv_nsec += (ms % 1000) * 1000000;
	if (until.tv_nsec >= 1000000000) {
		until.tv_sec++;
		until.tv_nsec -= 1000000000;
	}
	pthread_mutex_lock(&nobody_signals_lock);
	while (pthread_cond_timedwait(&nobody_signals, &nobody_signals_lock, &until) != ETIMEDOUT)
		;
	pthread_mutex_unlock(&nobody_signals_lock);
}

FRAME static void wait_leaf(int index, long long ms, int in_futex)
{
	if (in_futex)
		futex_wait_ms(ms);
	else
		sleep_ms(ms);
	NOT_A_TAIL_CALL();
	(void)index;
}

/* Some stack of its own, so that a copy holds more than libc's frames. */
FRAME static void wait_mid(int index, long long ms, int in_futex)
{
	volatile char scratch[512];

	scratch[index & 511] = (char)index;
	wait_leaf(index, ms, in_futex);
	after_call += scratch[index & 511];
}

FRAME static void serve(int index)
{
	/* From 0.75 to 1.25 times LONG_MS, by thread. */
	long long long_block = long_ms * 3 / 4 + long_ms * (index * 37 % 50) / 100;

	for (;;) {
		wait_mid(index, long_block, index % 2);
		for (int i = 0; i < shorts; i++)
			wait_mid(index, short_ms, 0);
		NOT_A_TAIL_CALL();
	}
}

static void *worker(void *arg)
{
	int index = (int)(long)arg;
	char name[16];

	snprintf(name, sizeof(name), "ff-blocked-%d", index);
	pthread_setname_np(pthread_self(), name);
	serve(index);
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: %s THREADS LONG_MS SHORT_MS SHORTS\n", argv[0]);
		return 2;
	}
	int threads = atoi(argv[1]);

	long_ms = atoll(argv[2]);
	short_ms = atoll(argv[3]);
	shorts = atoi(argv[4]);
	for (int i = 0; i < threads; i++) {
		pthread_t thread;

		if (pthread_create(&thread, NULL, worker, (void *)(long)i))
			return 1;
	}
	printf("ready %d\n", getpid());
	fflush(stdout);
	for (;;)
		pause();
}
