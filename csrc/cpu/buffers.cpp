// A cache of large output buffers for the conv kernels, so that a steady inference loop writes into
// memory that is already mapped.
//
// A torch CPU tensor of tens of MB comes from glibc malloc, which serves it from fresh mmap'd pages or
// from the heap depending on what was freed before (its mmap threshold moves, the heap top gets
// trimmed).  Fresh pages cost a page fault each on first write: on resnet18's layer1 at batch 32 (a
// 25.7 MB output, 6272 faults) that was 8 ms on top of a 14 ms layer, in some processes and not in
// others.  pooled_empty hands out freed blocks of the requested size instead; a block comes back
// when the last array (and so the last torch tensor made from it by torch.from_numpy) sharing its
// memory dies, and stays mapped for the next request of that size.  Free blocks are kept up to a
// byte limit (pool_set_limit; the oldest go first), and pool_release frees them all.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <list>
#include <mutex>
#include <string>
#include <vector>

#include "registration.h"

namespace py = pybind11;

namespace kcengine {
namespace {

constexpr size_t kAlign = 4096;  // page-aligned blocks; sizes rounded up to whole pages

// Free blocks in one list, oldest first.  A request takes the most recently freed block of its exact
// size; a returning block that would push the cached bytes past the limit evicts the oldest blocks
// first (so a warm-up at one shape does not hold the cache against later shapes).  A few dozen
// blocks at most in practice: linear scans.
class BufferPool {
 public:
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
        if (it->bytes != bytes) continue;
        void* p = it->ptr;
        free_.erase(std::next(it).base());
        cached_ -= bytes;
        ++hits_;
        return p;
      }
      ++misses_;
    }
    void* p = std::aligned_alloc(kAlign, bytes);
    if (!p) throw std::bad_alloc();
    return p;
  }

  // Called from a capsule destructor: never throws (a block it cannot keep is freed).
  void give_back(void* p, size_t bytes) noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    if (bytes > limit_) {
      std::free(p);
      return;
    }
    evict_to(limit_ - bytes);
    try {
      free_.push_back({p, bytes});
      cached_ += bytes;
    } catch (...) {
      std::free(p);
    }
  }

  size_t release() {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t freed = cached_;
    evict_to(0);
    return freed;
  }

  void set_limit(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    limit_ = bytes;
    evict_to(limit_);
  }

  struct Stats {
    size_t cached_bytes, cached_blocks, limit_bytes;
    uint64_t hits, misses;
  };
  Stats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {cached_, free_.size(), limit_, hits_, misses_};
  }

 private:
  struct Entry {
    void* ptr;
    size_t bytes;
  };

  void evict_to(size_t keep) {  // mu_ held
    while (cached_ > keep && !free_.empty()) {
      std::free(free_.front().ptr);
      cached_ -= free_.front().bytes;
      free_.pop_front();
    }
  }

  std::mutex mu_;
  std::list<Entry> free_;
  size_t cached_ = 0;
  size_t limit_ = size_t(512) << 20;
  uint64_t hits_ = 0, misses_ = 0;
};

// Never destroyed: arrays may outlive the module's static destructors at interpreter exit.
BufferPool& pool() {
  static BufferPool* p = new BufferPool();
  return *p;
}

struct Block {
  void* ptr;
  size_t bytes;
};

// shape [N, C, H, W] with channels_last: the memory is [N, H, W, C] and the array carries the strides
// of that layout (what torch.from_numpy turns into a channels-last tensor, not a view).
py::array pooled_empty(const std::vector<py::ssize_t>& shape, const py::object& dtype_like, bool channels_last) {
  const py::dtype dtype = py::dtype::from_args(dtype_like);
  if (!(dtype.is(py::dtype::of<float>()) || dtype.is(py::dtype::of<double>())))
    throw py::value_error("dtype must be float32 or float64, got " + std::string(py::str(dtype)));
  if (channels_last && shape.size() != 4)
    throw py::value_error("channels_last needs a 4-d shape, got " + std::to_string(shape.size()) + " dimensions");
  size_t count = 1;
  for (py::ssize_t s : shape) {
    if (s < 0) throw py::value_error("shape entries must be >= 0, got " + std::to_string(s));
    if (s != 0 && count > (size_t(1) << 40) / static_cast<size_t>(s))
      throw py::value_error("shape is too large for a pooled buffer");
    count *= static_cast<size_t>(s);
  }
  const py::ssize_t item = dtype.itemsize();
  std::vector<py::ssize_t> strides(shape.size());
  if (channels_last) {
    const py::ssize_t C = shape[1], H = shape[2], W = shape[3];
    strides = {H * W * C * item, item, W * C * item, C * item};
  } else {
    py::ssize_t st = item;
    for (size_t d = shape.size(); d-- > 0;) {
      strides[d] = st;
      st *= shape[d];
    }
  }
  const size_t bytes = std::max<size_t>(kAlign, (count * item + kAlign - 1) / kAlign * kAlign);
  void* ptr = pool().take(bytes);
  Block* block = nullptr;
  try {
    block = new Block{ptr, bytes};
  } catch (...) {
    pool().give_back(ptr, bytes);
    throw;
  }
  py::capsule owner;
  try {
    owner = py::capsule(block, [](void* b) {
      Block* blk = static_cast<Block*>(b);
      pool().give_back(blk->ptr, blk->bytes);
      delete blk;
    });
  } catch (...) {  // the capsule does not own the block yet
    pool().give_back(ptr, bytes);
    delete block;
    throw;
  }
  return py::array(dtype, shape, strides, ptr, owner);  // from here the capsule returns the block
}

}  // namespace

void register_buffers(py::module_& m) {
  m.def("pooled_empty", &pooled_empty, py::arg("shape"), py::arg("dtype"), py::arg("channels_last") = false,
        "An uninitialized float array (C-contiguous, or 4-d channels-last) from the output-buffer cache");
  m.def("pool_release", []() { return pool().release(); }, "Frees every cached free block; returns the bytes freed");
  m.def("pool_set_limit", [](int64_t bytes) {
    if (bytes < 0) throw py::value_error("bytes must be >= 0, got " + std::to_string(bytes));
    pool().set_limit(static_cast<size_t>(bytes));
  }, py::arg("bytes"), "Most bytes of free blocks kept (0 = keep none)");
  m.def("pool_stats", []() {
    const BufferPool::Stats st = pool().stats();  // copied under the lock, the dict built after it (building
    py::dict d;                                    // it may run the GC, which may return a block)
    d["cached_bytes"] = st.cached_bytes;
    d["cached_blocks"] = st.cached_blocks;
    d["limit_bytes"] = st.limit_bytes;
    d["hits"] = st.hits;
    d["misses"] = st.misses;
    return d;
  },
        "cached_bytes, cached_blocks, limit_bytes, hits, misses of the output-buffer cache");
}

}  // namespace kcengine
