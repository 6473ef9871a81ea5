// The trace-pass tasks for the compiler's baseline instruction set (any CPU).
#define BP_CPU_ISA isa_default
#include "trace_tasks.h"
