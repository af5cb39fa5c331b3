/* One line naming the file, instead of a bare "Bus error", when a memory-mapped bank's file fails under its tensors.

   atlas_fast/mapped.py registers the address range of every file it maps read-only. A SIGBUS inside a range is a
   read past the end of a file that was truncated while mapped; a SIGSEGV inside one is a write into the read-only
   mapping. Neither can be resumed (returning re-executes the faulting access), and a Python handler would only run
   after the C handler returned, so this handler, in C, writes the range's message to stderr with write(2) and ends
   the process with _exit(1): both are async-signal-safe, nothing else is called. A fault outside every range is not
   ours: the previous action (the default, or faulthandler's traceback) is put back and the access re-executed, or
   the signal raised again when it was sent, not caused by a fault.

   A slot is filled (range, then messages) before its `used` flag is set, and the flag cleared before it is reused,
   so the handler never reads a half-written slot. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define SLOTS 256
#define MESSAGE 1024

static struct {
    volatile sig_atomic_t used;
    uintptr_t start, end;
    char bus[MESSAGE], segv[MESSAGE];
} slots[SLOTS];
static struct sigaction previous_bus, previous_segv;
static int installed;

static void on_fault(int sig, siginfo_t *info, void *context) {
    (void)context;
    uintptr_t address = (uintptr_t)info->si_addr;
    for (int i = 0; i < SLOTS; i++) {
        if (slots[i].used && slots[i].start <= address && address < slots[i].end) {
            const char *message = sig == SIGBUS ? slots[i].bus : slots[i].segv;
            ssize_t ignored = write(2, message, strlen(message));
            (void)ignored;
            _exit(1);
        }
    }
    sigaction(sig, sig == SIGBUS ? &previous_bus : &previous_segv, NULL);
    if (info->si_code <= 0)   /* sent by kill() or raise(): no access to re-execute */
        raise(sig);
}

/* Installs the handler for SIGBUS and SIGSEGV once; 0 on success. */
int atlas_mapped_fault_install(void) {
    if (installed)
        return 0;
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGBUS, &action, &previous_bus) != 0 || sigaction(SIGSEGV, &action, &previous_segv) != 0)
        return -1;
    installed = 1;
    return 0;
}

/* Registers [start, start + length) with its two messages; the slot, or -1 when all are taken. */
int atlas_mapped_fault_register(uintptr_t start, uintptr_t length, const char *bus, const char *segv) {
    for (int i = 0; i < SLOTS; i++) {
        if (slots[i].used)
            continue;
        slots[i].start = start;
        slots[i].end = start + length;
        strncpy(slots[i].bus, bus, MESSAGE - 1);
        slots[i].bus[MESSAGE - 1] = '\0';
        strncpy(slots[i].segv, segv, MESSAGE - 1);
        slots[i].segv[MESSAGE - 1] = '\0';
        __sync_synchronize();
        slots[i].used = 1;
        return i;
    }
    return -1;
}

void atlas_mapped_fault_unregister(int slot) {
    if (slot >= 0 && slot < SLOTS)
        slots[slot].used = 0;
}
