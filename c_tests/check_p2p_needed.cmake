# ctest: p2p_abi, linked to UcclTcpx::p2p only, depends on libuccl_p2p.so and reaches
# libuccl_tcpx.so.0 only through it (the library's own dependency and RUNPATH find it).
# cmake -DREADELF=... -DEXE=<p2p_abi> -P this
execute_process(COMMAND "${READELF}" -d "${EXE}" OUTPUT_VARIABLE dyn RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "readelf -d ${EXE} failed")
endif()
if(NOT dyn MATCHES "NEEDED[^\n]*\\[libuccl_p2p\\.so\\]")
  message(FATAL_ERROR "${EXE} does not depend on libuccl_p2p.so:\n${dyn}")
endif()
if(dyn MATCHES "NEEDED[^\n]*\\[libuccl_tcpx\\.so")
  message(FATAL_ERROR "${EXE} depends on libuccl_tcpx directly:\n${dyn}")
endif()
message(STATUS "p2p_abi needs libuccl_p2p.so only: PASSED")
