// Loop annotations for the CPU kernels. `omp simd` lets the compiler vectorise a loop, and a
// reduction clause lets it reorder one sum across lanes, which plain -O3 may not do for floats;
// no -ffast-math, so nothing else about the arithmetic changes. Needs -fopenmp-simd (or -fopenmp).
#pragma once

#define I2X_PRAGMA(x) _Pragma(#x)
#define I2X_SIMD I2X_PRAGMA(omp simd)
#define I2X_SIMD_SUM(var) I2X_PRAGMA(omp simd reduction(+ : var))
