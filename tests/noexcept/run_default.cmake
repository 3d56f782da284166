# The default error handler prints "ctxcomp: fatal error: <message>" and aborts.
execute_process(COMMAND ${EXE} default ${SCENARIO} RESULT_VARIABLE rv OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rv EQUAL 0 OR NOT err MATCHES "ctxcomp: fatal error: ")
  message(FATAL_ERROR "expected an abort with the default handler's message; exit '${rv}', stderr '${err}', stdout '${out}'")
endif()
