// A thin C ABI over libtorch's own c10d (torch.distributed's engine):
// a TCPStore rendezvous and a ProcessGroupGloo, with a bucket-wise sum
// all-reduce. libtorch_cpu.so exports every function called here; the gloo
// headers (not in the torch wheel) come from Debian's libgloo-dev, which is
// enough because gloo objects are only held through pointers.
//
// Every entry point catches every C++ exception and writes a one-line
// message (c10 backtraces stripped) into the caller's buffer.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <c10/util/Logging.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
  std::chrono::milliseconds timeout;
};

void fail(char* err, size_t n, const std::string& what) {
  if (err == nullptr || n == 0) return;
  // one line: the first line of the message (later ones are C++ frames)
  std::string line = what.substr(0, what.find('\n'));
  std::snprintf(err, n, "%s", line.c_str());
}

template <typename F>
int guarded(char* err, size_t n, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    fail(err, n, e.what_without_backtrace());
  } catch (const std::exception& e) {
    fail(err, n, e.what());
  } catch (...) {
    fail(err, n, "unknown C++ exception");
  }
  return 1;
}

}  // namespace

// Rendezvous at host:port (rank 0 serves the store unless `store_server` is
// 0, e.g. under torchrun's agent store) and connect the Gloo group. Network
// interfaces: `ifaces`, comma-separated (GLOO_SOCKET_IFNAME), or empty for
// the host's default address.
extern "C" void* caev2_dist_init(const char* host, int port, int rank, int world, int store_server, int timeout_ms,
                                 const char* ifaces, char* err, size_t n) {
  Group* group = nullptr;
  // c10d logs every connection retry and timeout to stderr; the caller
  // reports the failure in one line instead (TORCH_CPP_LOG_LEVEL still
  // brings the log back)
  if (std::getenv("TORCH_CPP_LOG_LEVEL") == nullptr) FLAGS_caffe2_log_level = std::max(FLAGS_caffe2_log_level, 3);
  guarded(err, n, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions o;
    o.port = static_cast<uint16_t>(port);
    o.isServer = store_server != 0;
    o.numWorkers = world;
    o.waitWorkers = false;
    o.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), o);
    auto store = c10::make_intrusive<c10d::PrefixStore>("caev2", tcp);
    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    std::string names(ifaces == nullptr ? "" : ifaces);
    if (names.empty()) {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    } else {
      std::stringstream ss(names);
      std::string name;
      while (std::getline(ss, name, ',')) {
        if (!name.empty()) opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(name));
      }
    }
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
    group = new Group{pg, timeout};
  });
  return group;
}

// Sum each of `count` tensors (tch's `*mut C_tensor`, i.e. `at::Tensor*`)
// over all ranks, in place. All are started before any is waited for, so
// Gloo's threads overlap the buckets.
extern "C" int caev2_dist_allreduce_sum(void* handle, void** tensors, size_t count, char* err, size_t n) {
  return guarded(err, n, [&] {
    auto* g = static_cast<Group*>(handle);
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    works.reserve(count);
    for (size_t i = 0; i < count; ++i) {
      std::vector<at::Tensor> one{*static_cast<at::Tensor*>(tensors[i])};
      works.push_back(g->pg->allreduce(one));
    }
    for (auto& w : works) w->wait(g->timeout);
  });
}

extern "C" void caev2_dist_free(void* handle) {
  delete static_cast<Group*>(handle);
}
