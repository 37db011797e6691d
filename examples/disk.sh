#!/bin/sh
# Example ops script: reports free space on / as the structured result (fd 3).
free_gb=$(df -Pk / | awk 'NR==2 {print int($4 / 1048576)}')
echo "free space on /: ${free_gb} GiB"
echo "{\"disk_free_gb\": ${free_gb}}" >&3
