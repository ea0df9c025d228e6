import os,struct,time,sys
fd=os.open('/dev/cpu_dma_latency',os.O_WRONLY); os.write(fd,struct.pack('i',int(sys.argv[1]) if len(sys.argv)>1 else 0))
time.sleep(100000)
