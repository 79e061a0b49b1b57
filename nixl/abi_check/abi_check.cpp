// Checks nixl/nixl_abi.h against a NIXL source tree's own headers (scripts/nixl_abi_check.sh):
// NIXL's classes at the global scope, ours in namespace `ours`, compared by size, alignment,
// member offset and virtual function slot, and by NIXL's own inline accessors reading an engine
// that our declaration constructed (which is what NIXL does with the plugin's engine).
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "backend/backend_plugin.h"

namespace ours {
#include "nixl_abi.h"
}

static int failures = 0;

#define SAME(what, a, b)                                                                        \
    do {                                                                                        \
        long long x_ = (long long)(a);                                                                        \
        long long y_ = (long long)(b);                                                                        \
        if (x_ != y_) {                                                                         \
            std::printf("MISMATCH %s: NIXL %lld, ours %lld\n", what, x_, y_); \
            ++failures;                                                                         \
        }                                                                                       \
    } while (0)

#define SAME_TYPE(T) \
    SAME("sizeof " #T, sizeof(::T), sizeof(ours::T)); \
    SAME("alignof " #T, alignof(::T), alignof(ours::T))

#define SAME_FIELD(T, f) SAME("offsetof " #T "::" #f, offsetof(::T, f), offsetof(ours::T, f))

// Itanium C++ ABI: a pointer to a virtual member function holds 1 + the byte offset of its slot.
template<class P> static long long slot(P p) {
    struct {
        uintptr_t ptr;
        ptrdiff_t adj;
    } raw;
    static_assert(sizeof(p) == sizeof(raw));
    std::memcpy(&raw, &p, sizeof(raw));
    return (raw.ptr & 1) ? (long long)(raw.ptr - 1) / 8 : -1;
}

#define SAME_SLOT(f) SAME("vtable slot of " #f, slot(&::nixlBackendEngine::f), slot(&ours::nixlBackendEngine::f))

template<class E> static long long data_offset(bool E::*p) {
    ptrdiff_t off;
    std::memcpy(&off, &p, sizeof(off));
    return off;
}

// A concrete engine of our declaration, as the plugin's is.
struct OurEngine : ours::nixlBackendEngine {
    using B = ours::nixlBackendEngine;
    explicit OurEngine(const ours::nixlBackendInitParams *p) : B(p) {
        initErr = true;
        addTelemetryEvent(ours::nixl_telemetry_event_type_t::AGENT_TX_BYTES, 42);
    }
    bool supportsRemote() const override { return true; }
    bool supportsLocal() const override { return true; }
    bool supportsNotif() const override { return true; }
    ours::nixl_mem_list_t getSupportedMems() const override { return {}; }
    ours::nixl_status_t registerMem(const ours::nixlBlobDesc &, const ours::nixl_mem_t &,
                                    ours::nixlBackendMD *&) override { return ours::NIXL_SUCCESS; }
    ours::nixl_status_t deregisterMem(ours::nixlBackendMD *) override { return ours::NIXL_SUCCESS; }
    ours::nixl_status_t connect(const std::string &) override { return ours::NIXL_SUCCESS; }
    ours::nixl_status_t disconnect(const std::string &) override { return ours::NIXL_SUCCESS; }
    ours::nixl_status_t unloadMD(ours::nixlBackendMD *) override { return ours::NIXL_SUCCESS; }
    ours::nixl_status_t prepXfer(const ours::nixl_xfer_op_t &, const ours::nixl_meta_dlist_t &,
                                 const ours::nixl_meta_dlist_t &, const std::string &, ours::nixlBackendReqH *&,
                                 const ours::nixl_opt_b_args_t *) const override { return ours::NIXL_SUCCESS; }
    ours::nixl_status_t postXfer(const ours::nixl_xfer_op_t &, const ours::nixl_meta_dlist_t &,
                                 const ours::nixl_meta_dlist_t &, const std::string &, ours::nixlBackendReqH *&,
                                 const ours::nixl_opt_b_args_t *) const override { return ours::NIXL_SUCCESS; }
    ours::nixl_status_t checkXfer(ours::nixlBackendReqH *) const override { return ours::NIXL_SUCCESS; }
    ours::nixl_status_t releaseReqH(ours::nixlBackendReqH *) const override { return ours::NIXL_SUCCESS; }
    static long long init_err_offset() { return data_offset<B>(&OurEngine::initErr); }
};

struct NixlEngineOffsets : ::nixlBackendEngine {
    static long long init_err_offset() { return data_offset<::nixlBackendEngine>(&NixlEngineOffsets::initErr); }
};

int main() {
    SAME_TYPE(nixlBasicDesc);
    SAME_FIELD(nixlBasicDesc, addr);
    SAME_FIELD(nixlBasicDesc, len);
    SAME_FIELD(nixlBasicDesc, devId);
    SAME_TYPE(nixlBlobDesc);
    SAME_FIELD(nixlBlobDesc, metaInfo);
    SAME_TYPE(nixlMetaDesc);
    SAME_FIELD(nixlMetaDesc, metadataP);
    SAME_TYPE(nixlRemoteMetaDesc);
    SAME_FIELD(nixlRemoteMetaDesc, remoteAgent);
    SAME_TYPE(nixl_meta_dlist_t);
    SAME_TYPE(nixlBackendMD);
    SAME_TYPE(nixlBackendReqH);
    SAME_TYPE(nixlBackendOptionalArgs);
    SAME_FIELD(nixlBackendOptionalArgs, notifMsg);
    SAME_FIELD(nixlBackendOptionalArgs, hasNotif);
    SAME_FIELD(nixlBackendOptionalArgs, customParam);
    SAME_TYPE(nixlBackendInitParams);
    SAME_FIELD(nixlBackendInitParams, localAgent);
    SAME_FIELD(nixlBackendInitParams, type);
    SAME_FIELD(nixlBackendInitParams, customParams);
    SAME_FIELD(nixlBackendInitParams, enableProgTh);
    SAME_FIELD(nixlBackendInitParams, pthrDelay);
    SAME_FIELD(nixlBackendInitParams, syncMode);
    SAME_FIELD(nixlBackendInitParams, enableTelemetry_);
    SAME_TYPE(nixlTelemetryEvent);
    SAME_FIELD(nixlTelemetryEvent, eventType_);
    SAME_FIELD(nixlTelemetryEvent, value_);
    SAME_TYPE(nixlBackendPlugin);
    SAME_FIELD(nixlBackendPlugin, api_version);
    SAME_FIELD(nixlBackendPlugin, create_engine);
    SAME_FIELD(nixlBackendPlugin, destroy_engine);
    SAME_FIELD(nixlBackendPlugin, get_plugin_name);
    SAME_FIELD(nixlBackendPlugin, get_plugin_version);
    SAME_FIELD(nixlBackendPlugin, get_backend_options);
    SAME_FIELD(nixlBackendPlugin, get_backend_mems);
    SAME_TYPE(nixlBackendEngine);
    SAME("offset of nixlBackendEngine::initErr", NixlEngineOffsets::init_err_offset(), OurEngine::init_err_offset());
    SAME("NIXL_PLUGIN_API_VERSION", NIXL_PLUGIN_API_VERSION, 1);
    SAME("nixl_status_t NIXL_ERR_REMOTE_DISCONNECT", ::NIXL_ERR_REMOTE_DISCONNECT, ours::NIXL_ERR_REMOTE_DISCONNECT);
    SAME("nixl_status_t NIXL_ERR_NO_TELEMETRY", ::NIXL_ERR_NO_TELEMETRY, ours::NIXL_ERR_NO_TELEMETRY);
    SAME("nixl_mem_t FILE_SEG", ::FILE_SEG, ours::FILE_SEG);
    SAME("nixl_mem_t VRAM_SEG", ::VRAM_SEG, ours::VRAM_SEG);
    SAME("nixl_xfer_op_t NIXL_WRITE", ::NIXL_WRITE, ours::NIXL_WRITE);
    SAME("telemetry AGENT_ERR_BACKEND", (int)::nixl_telemetry_event_type_t::AGENT_ERR_BACKEND,
         (int)ours::nixl_telemetry_event_type_t::AGENT_ERR_BACKEND);
    SAME("telemetry AGENT_TELEMETRY_EVENTS_DROPPED",
         (int)::nixl_telemetry_event_type_t::AGENT_TELEMETRY_EVENTS_DROPPED,
         (int)ours::nixl_telemetry_event_type_t::AGENT_TELEMETRY_EVENTS_DROPPED);

    SAME_SLOT(supportsRemote);
    SAME_SLOT(supportsLocal);
    SAME_SLOT(supportsNotif);
    SAME_SLOT(getSupportedMems);
    SAME_SLOT(registerMem);
    SAME_SLOT(deregisterMem);
    SAME_SLOT(connect);
    SAME_SLOT(disconnect);
    SAME_SLOT(unloadMD);
    SAME_SLOT(prepXfer);
    SAME_SLOT(postXfer);
    SAME_SLOT(checkXfer);
    SAME_SLOT(releaseReqH);
    using NixlRemoteView = nixl_status_t (::nixlBackendEngine::*)(const ::nixl_remote_meta_dlist_t &, nixlMemViewH &,
                                                                  const ::nixl_opt_b_args_t *) const;
    using OurRemoteView = ours::nixl_status_t (ours::nixlBackendEngine::*)(
        const ours::nixl_remote_meta_dlist_t &, ours::nixlMemViewH &, const ours::nixl_opt_b_args_t *) const;
    using NixlLocalView = nixl_status_t (::nixlBackendEngine::*)(const ::nixl_meta_dlist_t &, nixlMemViewH &,
                                                                 const ::nixl_opt_b_args_t *) const;
    using OurLocalView = ours::nixl_status_t (ours::nixlBackendEngine::*)(
        const ours::nixl_meta_dlist_t &, ours::nixlMemViewH &, const ours::nixl_opt_b_args_t *) const;
    SAME("vtable slot of prepMemView(remote)", slot(static_cast<NixlRemoteView>(&::nixlBackendEngine::prepMemView)),
         slot(static_cast<OurRemoteView>(&ours::nixlBackendEngine::prepMemView)));
    SAME("vtable slot of prepMemView(local)", slot(static_cast<NixlLocalView>(&::nixlBackendEngine::prepMemView)),
         slot(static_cast<OurLocalView>(&ours::nixlBackendEngine::prepMemView)));
    SAME_SLOT(releaseMemView);
    SAME_SLOT(getPublicData);
    SAME_SLOT(getConnInfo);
    SAME_SLOT(loadRemoteConnInfo);
    SAME_SLOT(loadRemoteMD);
    SAME_SLOT(loadLocalMD);
    SAME_SLOT(getNotifs);
    SAME_SLOT(genNotif);
    SAME_SLOT(queryMem);
    SAME_SLOT(estimateXferCost);

    // NIXL's inline accessors reading an engine built by our declaration.
    ours::nixl_b_params_t params{{"num_channels", "3"}};
    ours::nixlBackendInitParams init;
    init.localAgent = "agent-x";
    init.type = "TCPX";
    init.customParams = &params;
    init.enableTelemetry_ = true;
    OurEngine engine(&init);
    auto *seen = reinterpret_cast<::nixlBackendEngine *>(static_cast<ours::nixlBackendEngine *>(&engine));
    SAME("getInitErr() of our engine", seen->getInitErr(), true);
    SAME("getType() of our engine", seen->getType() == "TCPX", true);
    SAME("getCustomParams() of our engine", seen->getCustomParams().at("num_channels") == "3", true);
    auto events = seen->getTelemetryEvents();
    SAME("telemetry events of our engine", events.size(), 1u);
    if (events.size() == 1) {
        SAME("telemetry event value", events[0].value_, 42u);
        SAME("telemetry event type", (int)events[0].eventType_, (int)::nixl_telemetry_event_type_t::AGENT_TX_BYTES);
    }

    std::printf("%s\n", failures ? "nixl_abi.h does NOT match" : "nixl_abi.h matches NIXL's headers");
    return failures ? 1 : 0;
}
