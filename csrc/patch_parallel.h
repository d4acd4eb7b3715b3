// comm_fast::parallel_for: at::parallel_for, made parallel in this extension too.
//
// With ATen's OpenMP backend (the default wheels), at::parallel_for is an inline
// `#pragma omp parallel` in the headers: an extension compiled without -fopenmp runs it on one
// thread. setup.py and CMakeLists.txt do not pass -fopenmp, so in that case the range is split
// here over at::get_num_threads() threads (the caller's plus short-lived std::threads); built
// with -fopenmp (or against a native-backend ATen) this is at::parallel_for itself.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace comm_fast {

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
#if defined(_OPENMP) || !AT_PARALLEL_OPENMP
  at::parallel_for(begin, end, grain, f);
#else
  const int64_t n = end - begin;
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain);
  if (tasks <= 1 || at::in_parallel_region()) {
    f(begin, end);
    return;
  }
  const int64_t chunk = (n + tasks - 1) / tasks;
  std::exception_ptr error;
  std::mutex mutex;
  auto run = [&](int64_t b) {
    try {
      f(b, std::min(b + chunk, end));
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex);
      if (!error) error = std::current_exception();
    }
  };
  std::vector<std::thread> threads;
  for (int64_t t = 1; t < tasks && begin + t * chunk < end; ++t) threads.emplace_back(run, begin + t * chunk);
  run(begin);
  for (auto& t : threads) t.join();
  if (error) std::rethrow_exception(error);
#endif
}

}  // namespace comm_fast
