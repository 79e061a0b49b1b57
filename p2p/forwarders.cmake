# libuccl_p2p.so, part 2 of 2: the C functions of uccl_engine.h, exported again by libuccl_p2p.so.
#
# Builds that link only -luccl_p2p (NIXL's meson build looks for that library alone, and links with
# --no-undefined) must find the C functions there, while the code stays in libuccl_tcpx.so.0: a
# second copy would give the process two engines' worth of handle tables and two notification
# queues. So libuccl_p2p.so defines each C function as a forwarder that calls the definition in
# libuccl_tcpx.so.0, looked up by name in that library (calling it by name would bind to the
# forwarder itself, which comes first in the lookup order of anything linked to libuccl_p2p.so).
#
# The forwarders are generated from the header at configure time, so every function the C ABI
# declares is forwarded without a list to keep in step; the generated file includes the header, so
# a parameter list read wrongly fails to compile. cbindgen writes one declaration per line
# (`args = "horizontal"` in cbindgen.toml), which is what the parser below relies on.
#
# uccl_p2p_generate_forwarders(<uccl_engine.h> <output .c>)
set(_uccl_p2p_dir "${CMAKE_CURRENT_LIST_DIR}")
function(uccl_p2p_generate_forwarders header out)
  file(STRINGS "${header}" lines REGEX "^[A-Za-z].*[ *]uccl_engine_[A-Za-z0-9_]+\\(.*\\);$")
  set(defs "")
  set(table "")
  set(count 0)
  foreach(line IN LISTS lines)
    if(NOT line MATCHES "^(.*[ *])(uccl_engine_[A-Za-z0-9_]+)\\((.*)\\);$")
      message(FATAL_ERROR "cannot read the declaration: ${line}")
    endif()
    set(ret "${CMAKE_MATCH_1}")
    set(name "${CMAKE_MATCH_2}")
    set(params "${CMAKE_MATCH_3}")
    string(STRIP "${ret}" ret)
    set(args "")
    if(NOT params STREQUAL "void" AND NOT params STREQUAL "")
      string(REPLACE "," ";" param_list "${params}")
      foreach(p IN LISTS param_list)
        string(STRIP "${p}" p)
        if(NOT p MATCHES "([A-Za-z_][A-Za-z0-9_]*)$")
          message(FATAL_ERROR "no parameter name in \"${p}\" of ${name}")
        endif()
        list(APPEND args "${CMAKE_MATCH_1}")
      endforeach()
    endif()
    list(JOIN args ", " args)
    if(ret STREQUAL "void")
      set(call "  fn(${args});")
    else()
      set(call "  return fn(${args});")
    endif()
    string(APPEND defs
      "UCCL_P2P_EXPORT ${ret} ${name}(${params}) {\n"
      "  __typeof__(&${name}) fn;\n"
      "  void *target = uccl_p2p_target(${count});\n"
      "  memcpy(&fn, &target, sizeof fn);\n"
      "${call}\n"
      "}\n\n")
    string(APPEND table "  \"${name}\",\n")
    math(EXPR count "${count} + 1")
  endforeach()
  if(count LESS 20)
    message(FATAL_ERROR "${header} yielded only ${count} C functions; has its layout changed?")
  endif()

  set(UCCL_P2P_COUNT "${count}")
  set(UCCL_P2P_NAMES "${table}")
  set(UCCL_P2P_FORWARDERS "${defs}")
  # configure_file rewrites the output only when it changes, so a reconfigure rebuilds nothing.
  configure_file("${_uccl_p2p_dir}/forwarders.c.in" "${out}" @ONLY)
endfunction()
