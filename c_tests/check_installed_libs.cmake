# ctest: the installed shared library records its SONAME and NODELETE, its link chain resolves to
# it through relative links, it needs no C++ runtime; libuccl_p2p.so (UCCL's name) is a library of
# its own that loads it from its own directory and exports every UCCL function (uccl_engine_*) it
# exports; and the package files name no absolute path of the prefix (the tree is relocatable).
# cmake -DREADELF=... -DLIBDIR=<prefix>/lib -DPREFIX=<prefix> -DSONAME=libuccl_tcpx.so.0 -P this
cmake_policy(SET CMP0057 NEW)  # if(IN_LIST) in script mode
set(failures 0)
macro(fail msg)
  message(SEND_ERROR "${msg}")
  math(EXPR failures "${failures} + 1")
endmacro()

set(lib "${LIBDIR}/${SONAME}")
if(NOT EXISTS "${lib}")
  message(FATAL_ERROR "${lib} is missing")
endif()
get_filename_component(real "${lib}" REALPATH)

foreach(name IN ITEMS ${SONAME} libuccl_tcpx.so)
  set(path "${LIBDIR}/${name}")
  if(NOT IS_SYMLINK "${path}")
    fail("${path} is not a symbolic link")
    continue()
  endif()
  file(READ_SYMLINK "${path}" target)
  if(IS_ABSOLUTE "${target}")
    fail("${path} -> ${target} is absolute; the tree would not be relocatable")
  endif()
  get_filename_component(resolved "${path}" REALPATH)
  if(NOT resolved STREQUAL real)
    fail("${path} resolves to ${resolved}, not ${real}")
  endif()
endforeach()

execute_process(COMMAND "${READELF}" -d "${lib}" OUTPUT_VARIABLE dyn RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  fail("readelf -d ${lib} failed")
else()
  string(REGEX MATCH "\\(SONAME\\)[^\n]*" soname_line "${dyn}")
  if(NOT soname_line MATCHES "\\[${SONAME}\\]")
    fail("${SONAME}: SONAME line is \"${soname_line}\", want [${SONAME}]")
  else()
    message(STATUS "${SONAME}: ${soname_line}")
  endif()
  string(REGEX MATCH "\\(FLAGS_1\\)[^\n]*" flags_line "${dyn}")
  if(NOT flags_line MATCHES "NODELETE")
    fail("${SONAME}: FLAGS_1 line is \"${flags_line}\", want NODELETE")
  else()
    message(STATUS "${SONAME}: ${flags_line}")
  endif()
  # C programs link this library; the C++ layer lives in libuccl_p2p.so.
  if(dyn MATCHES "NEEDED[^\n]*\\[(libstdc\\+\\+|libc\\+\\+)[^]]*\\]")
    fail("${SONAME} depends on a C++ runtime (${CMAKE_MATCH_1})")
  endif()
endif()

# libuccl_p2p.so: a file of its own (UCCL's library has no SONAME, so programs built against it ask
# for this exact name), depending on the C library and finding it next to itself.
set(p2p "${LIBDIR}/libuccl_p2p.so")
if(IS_SYMLINK "${p2p}" OR NOT EXISTS "${p2p}")
  fail("${p2p} is missing or a link; it is a library of its own")
else()
  execute_process(COMMAND "${READELF}" -d "${p2p}" OUTPUT_VARIABLE p2p_dyn RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    fail("readelf -d ${p2p} failed")
  else()
    foreach(want IN ITEMS "\\(SONAME\\)[^\n]*\\[libuccl_p2p\\.so\\]"
                          "NEEDED[^\n]*\\[${SONAME}\\]"
                          "\\(RUNPATH\\)[^\n]*\\[\\$ORIGIN\\]")
      if(NOT p2p_dyn MATCHES "${want}")
        fail("libuccl_p2p.so: no dynamic entry matching ${want}:\n${p2p_dyn}")
      endif()
    endforeach()
  endif()
endif()

# The C ABI is the whole interface of libuccl_tcpx.so.0: every exported function is an
# uccl_engine_* C symbol. libuccl_p2p.so exports each of them too (and UCCL's C++ names, which
# p2p_abi and scripts/p2p_symbols.sh check).
function(exported_functions file out)
  execute_process(COMMAND "${READELF}" --dyn-syms -W "${file}" OUTPUT_VARIABLE syms RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "readelf --dyn-syms ${file} failed")
  endif()
  string(REGEX MATCHALL "FUNC +GLOBAL +DEFAULT +[0-9]+ [^\n@]+" defs "${syms}")
  set(names "")
  foreach(d IN LISTS defs)
    string(REGEX REPLACE ".* " "" n "${d}")
    list(APPEND names "${n}")
  endforeach()
  set(${out} "${names}" PARENT_SCOPE)
endfunction()
exported_functions("${lib}" c_funcs)
foreach(sym IN ITEMS uccl_engine_create uccl_engine_connect uccl_engine_get_metadata
                     uccl_engine_read_vector uccl_engine_get_notifs uccl_engine_poll)
  if(NOT sym IN_LIST c_funcs)
    fail("${lib} does not export ${sym}")
  endif()
endforeach()
foreach(sym IN LISTS c_funcs)
  if(NOT sym MATCHES "^uccl_(engine|tcpx)_")
    fail("${lib} exports ${sym}, which is not part of the C ABI")
  endif()
endforeach()
# libuccl_p2p.so stands in for UCCL's library: it forwards UCCL's functions (uccl_engine_*), not
# this library's own additions (uccl_tcpx_*), which no program built against UCCL calls.
if(EXISTS "${p2p}" AND NOT IS_SYMLINK "${p2p}")
  exported_functions("${p2p}" p2p_funcs)
  foreach(sym IN LISTS c_funcs)
    if(sym MATCHES "^uccl_engine_" AND NOT sym IN_LIST p2p_funcs)
      fail("libuccl_p2p.so does not export ${sym}, which ${SONAME} exports")
    endif()
  endforeach()
endif()

foreach(file IN ITEMS "${LIBDIR}/cmake/UcclTcpx/UcclTcpxConfig.cmake"
                      "${LIBDIR}/cmake/UcclTcpx/UcclTcpxConfigVersion.cmake"
                      "${LIBDIR}/pkgconfig/uccl_tcpx.pc")
  if(NOT EXISTS "${file}")
    fail("${file} is missing")
    continue()
  endif()
  file(READ "${file}" text)
  string(FIND "${text}" "${PREFIX}" at)
  if(NOT at EQUAL -1)
    fail("${file} contains the install prefix ${PREFIX}; the tree would not be relocatable")
  endif()
endforeach()

if(failures GREATER 0)
  message(FATAL_ERROR "${failures} check(s) failed")
endif()
message(STATUS "installed libraries: PASSED")
